/* The FFN's two products over bundle rows, one token (flashio.kernels).
 *
 * A bundle row holds a neuron's up (and gate) column and its down row side by side, so the rows
 * a layer computes are a strided matrix: `rows` points at the first element of the part, row n
 * starts `stride` elements later than row n-1, and a part is `len` contiguous elements.
 *
 *   flashio_dot:  out[n] = sum_k row_n[k] * x[k]        (up, gate: one dot product per neuron)
 *   flashio_axpy: y[k]   = sum_n a[n] * row_n[k]        (down: rows with a[n] == 0 are skipped)
 *
 * Elements are float32 (dtype 0), float16 (1) or bfloat16 (2), widened to float32 as they are
 * loaded; x, a, out and y are float32 and every sum is accumulated in float32. torch's CPU float16
 * and bfloat16 matrix-vector products are fast only for a contiguous matrix multiplied from the
 * right; these run at the memory's speed on the strided rows in both directions.
 *
 * Quantized rows (flashio.quant) have their own products below; on CPUs with AVX-512 VNNI their dot
 * products take x rounded to int8 in blocks of 32 (as llama.cpp's Q8_0 activations) and multiply
 * in integers (vnni_rows), which keeps int4 and int8 rows at the memory's speed instead of the
 * conversion instructions'.
 *
 * Quantized rows are short (a part of 2-4 KiB): their loops prefetch the next batch of rows while
 * they compute the current one (take4, PREFETCH; 5-50% faster). Float rows of 8 KiB and more
 * stream well without (prefetching made them 5-10% slower). A contiguous matrix is read a row at a
 * time, in order.
 *
 * Three builds of one source: AVX-512 (F + F16C, + VNNI where the CPU has it), AVX2 (+ F16C + FMA),
 * and portable C; the compiler's target flags choose (flashio.kernels compiles with -march=native).
 */
#define _GNU_SOURCE /* preadv */
#include <stdint.h>
#include <math.h>
#include <errno.h>
#include <unistd.h>
#include <sys/uio.h>
#include <stdlib.h>
#include <string.h>

#if defined(__F16C__)
#include <immintrin.h>
#endif
#if defined(__AVX512F__) && defined(__F16C__)
#define FLASHIO_AVX512 1
#include <immintrin.h>
#elif defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
#define FLASHIO_AVX2 1
#include <immintrin.h>
#endif

/* the float loops are inlined into a copy per dtype (FOR_DTYPE): the element conversion is then
 * chosen once, not per vector load (fp16 rows, a Llama-2-7B layer's FFN: 24 -> 27-28 GB/s) */
#define ALWAYS_INLINE inline __attribute__((always_inline))
#define FOR_DTYPE(dtype, call)     \
    do {                           \
        if ((dtype) == 1) {        \
            const int dt_ = 1;     \
            call;                  \
        } else if ((dtype) == 2) { \
            const int dt_ = 2;     \
            call;                  \
        } else {                   \
            const int dt_ = 0;     \
            call;                  \
        }                          \
    } while (0)

static inline float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0x1f) {
        bits = sign | 0x7f800000u | (man << 13); /* inf, nan */
    } else if (exp != 0) {
        bits = sign | ((exp + 112) << 23) | (man << 13);
    } else if (man == 0) {
        bits = sign;
    } else { /* subnormal: normalise */
        exp = 113;
        while (!(man & 0x400)) {
            man <<= 1;
            exp--;
        }
        bits = sign | (exp << 23) | ((man & 0x3ff) << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

#if defined(__F16C__)
#define HALF(h) _cvtsh_ss(h)
#else
#define HALF(h) half_to_float(h)
#endif

static inline float bf16_to_float(uint16_t b) {
    uint32_t bits = (uint32_t)b << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline float load1(const void *p, int64_t i, int dtype) {
    if (dtype == 0) return ((const float *)p)[i];
    if (dtype == 1) return HALF(((const uint16_t *)p)[i]);
    return bf16_to_float(((const uint16_t *)p)[i]);
}

#if FLASHIO_AVX512
#define VW 16
typedef __m512 vec;
static inline vec vload(const void *p, int64_t i, int dtype) {
    if (dtype == 0) return _mm512_loadu_ps((const float *)p + i);
    __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)p + i));
    if (dtype == 1) return _mm512_cvtph_ps(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
static inline vec vzero(void) { return _mm512_setzero_ps(); }
static inline vec vfmadd(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
static inline vec vset1(float a) { return _mm512_set1_ps(a); }
static inline vec vloadf(const float *p) { return _mm512_loadu_ps(p); }
static inline void vstoref(float *p, vec v) { _mm512_storeu_ps(p, v); }
static inline float vsum(vec v) { return _mm512_reduce_add_ps(v); }
#elif FLASHIO_AVX2
#define VW 8
typedef __m256 vec;
static inline vec vload(const void *p, int64_t i, int dtype) {
    if (dtype == 0) return _mm256_loadu_ps((const float *)p + i);
    __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)p + i));
    if (dtype == 1) return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
static inline vec vzero(void) { return _mm256_setzero_ps(); }
static inline vec vfmadd(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
static inline vec vset1(float a) { return _mm256_set1_ps(a); }
static inline vec vloadf(const float *p) { return _mm256_loadu_ps(p); }
static inline void vstoref(float *p, vec v) { _mm256_storeu_ps(p, v); }
static inline float vsum(vec v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#endif

static inline const char *row_at(const void *rows, int64_t n, int64_t stride, int dtype) {
    return (const char *)rows + n * stride * (dtype == 0 ? 4 : 2);
}

/* A quantized part is a few KiB, too short for the hardware's stream prefetcher, which starts over on
 * each row: the quantized loops prefetch the next batch of rows (`pf`) while they compute the
 * current one, a line of codes (and of the scales and offsets after them) per 64 bytes computed. */
#define PREFETCH(p) __builtin_prefetch((p), 0, 3)
typedef struct {
    const uint8_t *row[4];
    int n;
} batch;

/* the next up to four rows from *n on whose w (mask or coefficient; NULL: all) is nonzero */
static inline batch take4(const uint8_t *rows, int64_t row_bytes, const float *w, int64_t *n, int64_t n_rows,
                          int64_t *idx) {
    batch b = {{0, 0, 0, 0}, 0};
    for (; *n < n_rows && b.n < 4; (*n)++)
        if (!w || w[*n] != 0.0f) {
            idx[b.n] = *n;
            b.row[b.n++] = rows + *n * row_bytes;
        }
    return b;
}

static ALWAYS_INLINE float dot1(const void *row, const float *x, int64_t len, int dtype) {
    int64_t k = 0;
    float s = 0.0f;
#if defined(VW)
    vec a0 = vzero(), a1 = vzero(), a2 = vzero(), a3 = vzero();
    for (; k + 4 * VW <= len; k += 4 * VW) {
        a0 = vfmadd(vload(row, k, dtype), vloadf(x + k), a0);
        a1 = vfmadd(vload(row, k + VW, dtype), vloadf(x + k + VW), a1);
        a2 = vfmadd(vload(row, k + 2 * VW, dtype), vloadf(x + k + 2 * VW), a2);
        a3 = vfmadd(vload(row, k + 3 * VW, dtype), vloadf(x + k + 3 * VW), a3);
    }
    for (; k + VW <= len; k += VW) a0 = vfmadd(vload(row, k, dtype), vloadf(x + k), a0);
    s = vsum(a0) + vsum(a1) + vsum(a2) + vsum(a3);
#endif
    for (; k < len; k++) s += load1(row, k, dtype) * x[k];
    return s;
}

/* four rows at once: four independent streams keep more of the memory's requests in flight */
static ALWAYS_INLINE void dot4(const void *r0, const void *r1, const void *r2, const void *r3, const float *x, int64_t len,
                 int dtype, float *out) {
    int64_t k = 0;
    float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
#if defined(VW)
    vec a0 = vzero(), a1 = vzero(), a2 = vzero(), a3 = vzero();
    for (; k + VW <= len; k += VW) {
        vec xv = vloadf(x + k);
        a0 = vfmadd(vload(r0, k, dtype), xv, a0);
        a1 = vfmadd(vload(r1, k, dtype), xv, a1);
        a2 = vfmadd(vload(r2, k, dtype), xv, a2);
        a3 = vfmadd(vload(r3, k, dtype), xv, a3);
    }
    s0 = vsum(a0), s1 = vsum(a1), s2 = vsum(a2), s3 = vsum(a3);
#endif
    for (; k < len; k++) {
        s0 += load1(r0, k, dtype) * x[k];
        s1 += load1(r1, k, dtype) * x[k];
        s2 += load1(r2, k, dtype) * x[k];
        s3 += load1(r3, k, dtype) * x[k];
    }
    out[0] = s0, out[1] = s1, out[2] = s2, out[3] = s3;
}


#if defined(VW)
/* dot4 on two parts (gate and up) of the same four rows in one pass: eight streams, x loaded once */
static ALWAYS_INLINE void dot4x2(const char *const *row, int64_t o1, int64_t o2, const float *x, int64_t len, int dtype, float *out1,
                   float *out2) {
    vec a[4] = {vzero(), vzero(), vzero(), vzero()}, b[4] = {vzero(), vzero(), vzero(), vzero()};
    int64_t k = 0;
    for (; k + VW <= len; k += VW) {
        vec xv = vloadf(x + k);
        for (int r = 0; r < 4; r++) {
            a[r] = vfmadd(vload(row[r] + o1, k, dtype), xv, a[r]);
            b[r] = vfmadd(vload(row[r] + o2, k, dtype), xv, b[r]);
        }
    }
    for (int r = 0; r < 4; r++) {
        float s1 = vsum(a[r]), s2 = vsum(b[r]);
        for (int64_t j = k; j < len; j++) {
            s1 += load1(row[r] + o1, j, dtype) * x[j];
            s2 += load1(row[r] + o2, j, dtype) * x[j];
        }
        out1[r] = s1, out2[r] = s2;
    }
}
#endif

/* Longer rows (a dense down projection, 11008 wide) go four at a time: x is then loaded once per
 * four rows instead of once per row from beyond the L1 cache (4096 x 11008 fp16, one thread: 12 -> 22 GB/s) */
#define ROW_AT_A_TIME 4096

static ALWAYS_INLINE void dot_rows(const void *rows, int64_t stride, int64_t n_rows, int64_t len, int dtype,
                                   const float *x, float *out) {
    int64_t n = 0;
    if (stride == len && len <= ROW_AT_A_TIME) { /* a contiguous matrix: a row at a time, in order (the hardware's
                                                   * stream; 16 -> 22 GB/s) while x stays in the L1 cache */
        for (; n < n_rows; n++) out[n] = dot1(row_at(rows, n, stride, dtype), x, len, dtype);
        return;
    }
    for (; n + 4 <= n_rows; n += 4)
        dot4(row_at(rows, n, stride, dtype), row_at(rows, n + 1, stride, dtype), row_at(rows, n + 2, stride, dtype),
             row_at(rows, n + 3, stride, dtype), x, len, dtype, out + n);
    for (; n < n_rows; n++) out[n] = dot1(row_at(rows, n, stride, dtype), x, len, dtype);
}

static void dot_1(const void *rows, int64_t stride, int64_t n_rows, int64_t len, int dtype, const float *x, float *out) {
    FOR_DTYPE(dtype, dot_rows(rows, stride, n_rows, len, dt_, x, out));
}

/* y[k] += a0 * r0[k] + a1 * r1[k] + a2 * r2[k] + a3 * r3[k]: four rows per pass over y */
static ALWAYS_INLINE void axpy4(float *y, const void *r0, const void *r1, const void *r2, const void *r3,
                  float a0, float a1, float a2, float a3, int64_t len, int dtype) {
    int64_t k = 0;
#if defined(VW)
    vec b0 = vset1(a0), b1 = vset1(a1), b2 = vset1(a2), b3 = vset1(a3);
    for (; k + VW <= len; k += VW) {
        vec acc = vloadf(y + k);
        acc = vfmadd(vload(r0, k, dtype), b0, acc);
        acc = vfmadd(vload(r1, k, dtype), b1, acc);
        acc = vfmadd(vload(r2, k, dtype), b2, acc);
        acc = vfmadd(vload(r3, k, dtype), b3, acc);
        vstoref(y + k, acc);
    }
#endif
    for (; k < len; k++)
        y[k] += a0 * load1(r0, k, dtype) + a1 * load1(r1, k, dtype) + a2 * load1(r2, k, dtype) +
                a3 * load1(r3, k, dtype);
}

static ALWAYS_INLINE void axpy1(float *y, const void *r, float a, int64_t len, int dtype) {
    int64_t k = 0;
#if defined(VW)
    vec b = vset1(a);
    for (; k + VW <= len; k += VW) vstoref(y + k, vfmadd(vload(r, k, dtype), b, vloadf(y + k)));
#endif
    for (; k < len; k++) y[k] += a * load1(r, k, dtype);
}

static ALWAYS_INLINE void axpy_rows(const void *rows, int64_t stride, int64_t n_rows, int64_t len, int dtype,
                                    const float *a, float *y) {
    memset(y, 0, (size_t)len * sizeof(float));
    const void *r[4];
    float c[4];
    int m = 0;
    for (int64_t n = 0; n < n_rows; n++) {
        if (a[n] == 0.0f) continue; /* inactive neuron (ReLU zero, masked, zeroed): its row is not read */
        r[m] = row_at(rows, n, stride, dtype);
        c[m++] = a[n];
        if (m == 4) {
            axpy4(y, r[0], r[1], r[2], r[3], c[0], c[1], c[2], c[3], len, dtype);
            m = 0;
        }
    }
    for (int i = 0; i < m; i++) axpy1(y, r[i], c[i], len, dtype);
}

static void axpy_1(const void *rows, int64_t stride, int64_t n_rows, int64_t len, int dtype, const float *a, float *y) {
    FOR_DTYPE(dtype, axpy_rows(rows, stride, n_rows, len, dt_, a, y));
}

/* ---- the whole one-token FFN over bundle rows, one pass over each row ----
 * a_n = act(gate_n . x + b_gate_n) * (up_n . x + b_up_n)    (gated: gate >= 0)
 *     = (up_n . x + b_up_n) * gate_act_n                      (the gate computed elsewhere: gate_act)
 *     = act(up_n . x + b_up_n)                                (otherwise)
 * times mask_n; y = sum_n a_n down_n. Rows whose mask is 0 are not read at all, rows whose a_n is 0
 * only for their up (and gate) part. b_up, b_gate, gate_act, mask may be NULL; a (the activations,
 * [n_rows]) is written. act: 0 ReLU, 1 SiLU, 2 GELU (tanh approximation). */

static inline float activation(int act, float g) {
    if (act == 0) return g > 0.0f ? g : 0.0f;
    if (act == 1) return g / (1.0f + expf(-g));
    float t = tanhf(0.7978845608028654f * (g + 0.044715f * g * g * g));
    return 0.5f * g * (1.0f + t);
}

static ALWAYS_INLINE void ffn_rows(const void *rows, int64_t stride, int64_t n_rows, int64_t len, int dtype,
                                   int64_t up, int64_t gate, int64_t down, int act, const float *x, const float *b_up,
                                   const float *b_gate, const float *gate_act, const float *mask, float *a, float *y) {
    int64_t size = dtype == 0 ? 4 : 2, row_bytes = stride * size;
    memset(y, 0, (size_t)len * sizeof(float));
    if (mask)
        for (int64_t n = 0; n < n_rows; n++)
            if (mask[n] == 0.0f) a[n] = 0.0f; /* rows not read */
    const void *r[4];
    float c[4];
    int k = 0; /* rows queued for the down product */
    int64_t pos = 0, idx[4];
    batch cur = take4((const uint8_t *)rows, row_bytes, mask, &pos, n_rows, idx);
    while (cur.n > 0) {
        /* the up (and gate) dot products of the batch (not prefetched: rows of 8 KiB and more stream
         * well; prefetching the next batch made them 5-10% slower) */
        float u[4] = {0, 0, 0, 0}, g[4] = {0, 0, 0, 0};
        const char *row[4];
        for (int i = 0; i < cur.n; i++) row[i] = (const char *)cur.row[i];
#if defined(VW)
        if (cur.n == 4 && gate >= 0) { /* gate and up in one pass (5-8% faster than one after the other) */
            dot4x2(row, gate * size, up * size, x, len, dtype, g, u);
        } else
#endif
        if (cur.n == 4) {
            dot4(row[0] + up * size, row[1] + up * size, row[2] + up * size, row[3] + up * size, x, len, dtype, u);
            if (gate >= 0)
                dot4(row[0] + gate * size, row[1] + gate * size, row[2] + gate * size, row[3] + gate * size, x, len,
                     dtype, g);
        } else {
            for (int i = 0; i < cur.n; i++) {
                u[i] = dot1(row[i] + up * size, x, len, dtype);
                if (gate >= 0) g[i] = dot1(row[i] + gate * size, x, len, dtype);
            }
        }
        for (int i = 0; i < cur.n; i++) {
            int64_t j = idx[i];
            float v = u[i] + (b_up ? b_up[j] : 0.0f), out;
            if (gate >= 0)
                out = activation(act, g[i] + (b_gate ? b_gate[j] : 0.0f)) * v;
            else if (gate_act)
                out = v * gate_act[j];
            else
                out = activation(act, v);
            if (mask) out *= mask[j];
            a[j] = out;
            if (out != 0.0f) {
                r[k] = row[i] + down * size;
                c[k++] = out;
                if (k == 4) {
                    axpy4(y, r[0], r[1], r[2], r[3], c[0], c[1], c[2], c[3], len, dtype);
                    k = 0;
                }
            }
        }
        cur = take4((const uint8_t *)rows, row_bytes, mask, &pos, n_rows, idx);
    }
    for (int i = 0; i < k; i++) axpy1(y, r[i], c[i], len, dtype);
}

static void ffn_1(const void *rows, int64_t stride, int64_t n_rows, int64_t len, int dtype, int64_t up,
                 int64_t gate, int64_t down, int act, const float *x, const float *b_up, const float *b_gate,
                 const float *gate_act, const float *mask, float *a, float *y) {
    FOR_DTYPE(dtype, ffn_rows(rows, stride, n_rows, len, dt_, up, gate, down, act, x, b_up, b_gate, gate_act, mask, a, y));
}

/* ---- quantized rows (flashio.quant): codes, then fp16 scales (one per group), then fp16 offsets ----
 * element k of a part = code_k * scale_g + offset_g, g = k / group. int8: codes signed (symmetric,
 * no offsets) or unsigned (with offsets). int4: byte j holds element j in its low nibble and element
 * j + dim/2 in its high one, codes 0..15; symmetric int4 has no stored offsets: offset_g = -8 scale_g.
 * Two-level scales (super > 0, asymmetric int4): the scales' bytes hold an fp16 step d per super-block
 * of `super` elements then each group's 6-bit multiple sc of it, packed four in three bytes; scale_g =
 * d * sc_g (exact in float32), and likewise offset_g = -dmin * m_g from the offsets' bytes. Each row's
 * are decoded into float32 arrays before its codes are read (qptrs), so every path below takes a row's
 * scales and offsets by pointer (sc, of: fp16 in the row, or float32 decoded, L->super > 0: QS).
 * Scales in the codes (scales < 0: symmetric int8, one scale per part): the part's fp16 scale is the
 * parities of its first 16 codes, bit k in code k; qptrs assembles it into dec, read as fp16.
 * The vector paths need group % VW == 0 (and, for int4, (dim / 2) % VW == 0: segments whose low
 * and high nibbles each stay in one group then end on vector boundaries, see seg_end); else scalar. */

typedef struct {
    int64_t row_bytes, dim, group, codes, scales, offsets; /* offsets: byte position, or -1; scales -1: in the codes */
    int bits, sym4;
    int64_t super; /* two-level scales: elements per super-block; 0: fp16 scales in the row */
} qlayout;

static inline float h16(const uint8_t *p, int64_t i) {
    uint16_t v;
    memcpy(&v, p + 2 * i, 2);
    return HALF(v);
}

/* group g's scale (or offset) from a row's scales: fp16 in the row, or float32 decoded (two-level) */
#define QS(L, p, g) ((L)->super ? ((const float *)(p))[g] : h16((p), (g)))
#define QDTYPE(L) ((L)->super ? 0 : 1) /* the scales' dtype for dot1/axpy1: float32 or fp16 */

/* two-level rows: the part's scales into out[0, ng) and offsets into out[ng, 2 ng), float32. A
 * super-block holds a multiple of four groups (flashio.quant.default_super_size), so each four groups'
 * three bytes share one step. AVX2: eight groups at a time (their six bytes spread over eight lanes by
 * one shuffle, shifted, masked, widened, times the steps). */
static void qdecode(const uint8_t *row, const qlayout *L, float *out) {
    const int64_t ng = L->dim / L->group, ns = L->dim / L->super, quads = ng / ns / 4;
    float d[ng / 4]; /* each four groups' step (no division in the loops below: it cost half the time) */
    for (int w = 0; w < 2; w++) {
        const uint8_t *blk = row + (w ? L->offsets : L->scales), *b = blk + 2 * ns;
        float *o = out + w * ng;
        for (int64_t s = 0, j = 0; s < ns; s++) {
            const float step = w ? -h16(blk, s) : h16(blk, s);
            for (int64_t e = j + quads; j < e; j++) d[j] = step;
        }
        int64_t g = 0;
#if defined(__AVX2__)
        const __m256i spread = _mm256_setr_epi8(0, 1, 2, -1, 0, 1, 2, -1, 0, 1, 2, -1, 0, 1, 2, -1,
                                                3, 4, 5, -1, 3, 4, 5, -1, 3, 4, 5, -1, 3, 4, 5, -1);
        const __m256i shifts = _mm256_setr_epi32(0, 6, 12, 18, 0, 6, 12, 18), m6 = _mm256_set1_epi32(63);
        for (; g + 8 <= ng; g += 8) {
            /* eight bytes (two past the six) except for the last eight groups, whose six may end the
             * row; a six-byte copy costs a store-forwarding stall (it took half the time) */
            __m128i bytes;
            if (g + 8 < ng) {
                bytes = _mm_loadl_epi64((const __m128i *)(b + g / 4 * 3));
            } else {
                uint64_t word = 0;
                memcpy(&word, b + g / 4 * 3, 6);
                bytes = _mm_cvtsi64_si128((long long)word);
            }
            __m256i t = _mm256_shuffle_epi8(_mm256_broadcastq_epi64(bytes), spread);
            t = _mm256_and_si256(_mm256_srlv_epi32(t, shifts), m6);
            __m256 steps = _mm256_set_m128(_mm_set1_ps(d[g / 4 + 1]), _mm_set1_ps(d[g / 4]));
            _mm256_storeu_ps(o + g, _mm256_mul_ps(_mm256_cvtepi32_ps(t), steps));
        }
#endif
        for (; g < ng; g += 4) {
            const uint8_t *q = b + g / 4 * 3;
            uint32_t word = (uint32_t)q[0] | ((uint32_t)q[1] << 8) | ((uint32_t)q[2] << 16);
            for (int i = 0; i < 4; i++) o[g + i] = d[g / 4] * (float)((word >> (6 * i)) & 63u);
        }
    }
}

/* the fp16 scale carried by the parities of a part's first 16 codes (bit k in code k) */
static inline uint16_t qembedded(const uint8_t *c) {
#if defined(FLASHIO_AVX2) || defined(FLASHIO_AVX512)
    return (uint16_t)_mm_movemask_epi8(_mm_slli_epi16(_mm_loadu_si128((const __m128i *)c), 7));
#else
    uint16_t v = 0;
    for (int k = 0; k < 16; k++) v |= (uint16_t)((c[k] & 1u) << k);
    return v;
#endif
}

/* a row's scales and offsets (NULL: none stored): fp16 in the row, or decoded into dec (2 ng floats;
 * scales in the codes: the one fp16 scale) */
static inline void qptrs(const uint8_t *row, const qlayout *L, float *dec, const uint8_t **sc, const uint8_t **of) {
    if (L->super) {
        qdecode(row, L, dec);
        *sc = (const uint8_t *)dec, *of = (const uint8_t *)(dec + L->dim / L->group);
    } else if (L->scales < 0) {
        uint16_t h = qembedded(row + L->codes);
        memcpy(dec, &h, sizeof h);
        *sc = (const uint8_t *)dec, *of = NULL;
    } else {
        *sc = row + L->scales, *of = L->offsets >= 0 ? row + L->offsets : NULL;
    }
}

static inline float qcode(const uint8_t *row, const qlayout *L, int64_t k) {
    const uint8_t *c = row + L->codes;
    if (L->bits == 8) return L->offsets >= 0 ? (float)c[k] : (float)(int8_t)c[k];
    int64_t half = L->dim / 2;
    return k < half ? (float)(c[k] & 15) : (float)(c[k - half] >> 4);
}

static int qvector_ok(const qlayout *L) {
#if defined(VW)
    if (L->group % VW) return 0;
    return L->bits == 8 || (L->dim / 2) % VW == 0;
#else
    (void)L;
    return 0;
#endif
}

/* int4: the end of the segment of bytes from j on whose elements j.. (low nibbles) and half + j..
 * (high nibbles) each stay in one group */
static inline int64_t seg_end(int64_t j, int64_t half, int64_t G) {
    int64_t e = (j / G + 1) * G, h = ((half + j) / G + 1) * G - half;
    e = e < h ? e : h;
    return e < half ? e : half;
}

#if defined(VW)
/* VW codes starting at byte j as floats: int8 (signed or not), or int4's low and high nibbles */
static inline vec vcodes8(const uint8_t *c, int sgn) {
#if FLASHIO_AVX512
    __m128i b = _mm_loadu_si128((const __m128i *)c);
    return _mm512_cvtepi32_ps(sgn ? _mm512_cvtepi8_epi32(b) : _mm512_cvtepu8_epi32(b));
#else
    __m128i b = _mm_loadl_epi64((const __m128i *)c);
    return _mm256_cvtepi32_ps(sgn ? _mm256_cvtepi8_epi32(b) : _mm256_cvtepu8_epi32(b));
#endif
}
static inline void vcodes4(const uint8_t *c, vec *lo, vec *hi) {
#if FLASHIO_AVX512
    __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)c));
    *lo = _mm512_cvtepi32_ps(_mm512_and_si512(b, _mm512_set1_epi32(15)));
    *hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(b, 4));
#else
    __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)c));
    *lo = _mm256_cvtepi32_ps(_mm256_and_si256(b, _mm256_set1_epi32(15)));
    *hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4));
#endif
}
#endif

/* sum_g offset_g * xg[g] (vectorised over the fp16 offsets, or the scales for symmetric int4) */
static float qoffsets_dot(const uint8_t *sc, const uint8_t *of, const qlayout *L, const float *xg) {
    int64_t ng = L->dim / L->group;
    if (of) return dot1(of, xg, ng, QDTYPE(L));
    return L->sym4 ? -8.0f * dot1(sc, xg, ng, 1) : 0.0f;
}

/* og[g] += a * offset_g */
static void qoffsets_axpy(const uint8_t *sc, const uint8_t *of, const qlayout *L, float a, float *og) {
    int64_t ng = L->dim / L->group;
    if (of)
        axpy1(og, of, a, ng, QDTYPE(L));
    else if (L->sym4)
        axpy1(og, sc, -8.0f * a, ng, 1);
}

/* sum_k x[k] * element_k of one row (its scales sc and offsets of, see qptrs); xg[g] = sum of x over group g */
static float qdot1(const uint8_t *row, const uint8_t *sc, const uint8_t *of, const qlayout *L, const float *x,
                   const float *xg) {
    int64_t G = L->group, ng = L->dim / G;
    float s = 0.0f;
    if (qvector_ok(L)) {
#if defined(VW)
        const uint8_t *c = row + L->codes;
        vec tot = vzero();
        if (L->bits == 8) {
            int sgn = L->offsets < 0;
            for (int64_t g = 0; g < ng; g++) {
                vec acc = vzero();
                for (int64_t k = g * G; k < (g + 1) * G; k += VW) acc = vfmadd(vcodes8(c + k, sgn), vloadf(x + k), acc);
                tot = vfmadd(acc, vset1(QS(L, sc, g)), tot);
            }
        } else { /* segments of bytes whose low and high nibbles each stay in one group */
            int64_t half = L->dim / 2;
            for (int64_t j = 0; j < half;) {
                int64_t end = seg_end(j, half, G);
                vec alo = vzero(), ahi = vzero(), lo, hi;
                for (int64_t i = j; i < end; i += VW) {
                    vcodes4(c + i, &lo, &hi);
                    alo = vfmadd(lo, vloadf(x + i), alo);
                    ahi = vfmadd(hi, vloadf(x + half + i), ahi);
                }
                tot = vfmadd(alo, vset1(QS(L, sc, j / G)), tot);
                tot = vfmadd(ahi, vset1(QS(L, sc, (half + j) / G)), tot);
                j = end;
            }
        }
        s = vsum(tot);
#endif
    } else {
        for (int64_t g = 0; g < ng; g++) {
            float acc = 0.0f;
            for (int64_t k = g * G; k < (g + 1) * G; k++) acc += qcode(row, L, k) * x[k];
            s += acc * QS(L, sc, g);
        }
    }
    return s + qoffsets_dot(sc, of, L, xg);
}

/* y[k] += a * (code_k * scale_g) over one row; the offsets' part goes to og[g] += a * offset_g */
static void qaxpy1(const uint8_t *row, const uint8_t *sc, const uint8_t *of, const qlayout *L, float a, float *y,
                   float *og) {
    int64_t G = L->group, ng = L->dim / G;
    if (qvector_ok(L)) {
#if defined(VW)
        const uint8_t *c = row + L->codes;
        if (L->bits == 8) {
            int sgn = L->offsets < 0;
            for (int64_t g = 0; g < ng; g++) {
                vec b = vset1(a * QS(L, sc, g));
                for (int64_t k = g * G; k < (g + 1) * G; k += VW)
                    vstoref(y + k, vfmadd(vcodes8(c + k, sgn), b, vloadf(y + k)));
            }
        } else {
            int64_t half = L->dim / 2;
            vec lo, hi;
            for (int64_t j = 0; j < half;) {
                int64_t end = seg_end(j, half, G);
                vec blo = vset1(a * QS(L, sc, j / G)), bhi = vset1(a * QS(L, sc, (half + j) / G));
                for (int64_t i = j; i < end; i += VW) {
                    vcodes4(c + i, &lo, &hi);
                    vstoref(y + i, vfmadd(lo, blo, vloadf(y + i)));
                    vstoref(y + half + i, vfmadd(hi, bhi, vloadf(y + half + i)));
                }
                j = end;
            }
        }
#endif
    } else {
        for (int64_t g = 0; g < ng; g++) {
            float b = a * QS(L, sc, g);
            for (int64_t k = g * G; k < (g + 1) * G; k++) y[k] += b * qcode(row, L, k);
        }
    }
    qoffsets_axpy(sc, of, L, a, og);
}

static qlayout qmake(int64_t row_bytes, int64_t dim, int bits, int64_t group, int64_t codes, int64_t scales,
                     int64_t offsets, int64_t super) {
    qlayout L = {row_bytes, dim, group, codes, scales, offsets, bits, bits == 4 && offsets < 0, super};
    return L;
}

#if defined(VW)
/* qdot1 for four rows at once: independent accumulator chains, four streams in flight */
static void qdot4(const uint8_t *const *row, const uint8_t *const *sc, const uint8_t *const *of, const qlayout *L,
                  const float *x, const float *xg, float *out) {
    int64_t G = L->group;
    vec tot[4] = {vzero(), vzero(), vzero(), vzero()};
    const uint8_t *c[4] = {row[0] + L->codes, row[1] + L->codes, row[2] + L->codes, row[3] + L->codes};
    if (L->bits == 8) {
        int sgn = L->offsets < 0;
        for (int64_t g = 0; g < L->dim / G; g++) {
            vec acc[4] = {vzero(), vzero(), vzero(), vzero()};
            for (int64_t k = g * G; k < (g + 1) * G; k += VW) {
                vec xv = vloadf(x + k);
                for (int r = 0; r < 4; r++) acc[r] = vfmadd(vcodes8(c[r] + k, sgn), xv, acc[r]);
            }
            for (int r = 0; r < 4; r++) tot[r] = vfmadd(acc[r], vset1(QS(L, sc[r], g)), tot[r]);
        }
    } else {
        int64_t half = L->dim / 2;
        for (int64_t j = 0; j < half;) {
            int64_t end = seg_end(j, half, G), glo = j / G, ghi = (half + j) / G;
            vec alo[4] = {vzero(), vzero(), vzero(), vzero()}, ahi[4] = {vzero(), vzero(), vzero(), vzero()}, lo, hi;
            for (int64_t i = j; i < end; i += VW) {
                vec xl = vloadf(x + i), xh = vloadf(x + half + i);
                for (int r = 0; r < 4; r++) {
                    vcodes4(c[r] + i, &lo, &hi);
                    alo[r] = vfmadd(lo, xl, alo[r]);
                    ahi[r] = vfmadd(hi, xh, ahi[r]);
                }
            }
            for (int r = 0; r < 4; r++) {
                tot[r] = vfmadd(alo[r], vset1(QS(L, sc[r], glo)), tot[r]);
                tot[r] = vfmadd(ahi[r], vset1(QS(L, sc[r], ghi)), tot[r]);
            }
            j = end;
        }
    }
    for (int r = 0; r < 4; r++) out[r] = vsum(tot[r]) + qoffsets_dot(sc[r], of[r], L, xg);
}

/* qaxpy1 for four rows at once: one pass over y; the next batch's rows prefetched */
static void qaxpy4(const uint8_t *const *row, const uint8_t *const *sc, const uint8_t *const *of, const qlayout *L,
                   const float *a, float *y, float *og, const batch *pf) {
    int64_t G = L->group;
    const uint8_t *c[4] = {row[0] + L->codes, row[1] + L->codes, row[2] + L->codes, row[3] + L->codes};
    const int64_t nbytes = L->bits == 8 ? L->dim : L->dim / 2, extra = (L->dim / G) * (L->offsets >= 0 ? 4 : 2);
#define PF(i)                                                                          \
    if (((i) & 63) == 0)                                                               \
        for (int p = 0; p < pf->n; p++) {                                              \
            PREFETCH(pf->row[p] + L->codes + (i));                                     \
            if ((i) < extra) PREFETCH(pf->row[p] + L->codes + nbytes + (i));           \
        }
    if (L->bits == 8) {
        int sgn = L->offsets < 0;
        for (int64_t g = 0; g < L->dim / G; g++) {
            vec b[4];
            for (int r = 0; r < 4; r++) b[r] = vset1(a[r] * QS(L, sc[r], g));
            for (int64_t k = g * G; k < (g + 1) * G; k += VW) {
                PF(k)
                vec acc = vloadf(y + k);
                for (int r = 0; r < 4; r++) acc = vfmadd(vcodes8(c[r] + k, sgn), b[r], acc);
                vstoref(y + k, acc);
            }
        }
    } else {
        int64_t half = L->dim / 2;
        const int aligned = half % G == 0; /* segments are the groups: no divisions */
        for (int64_t j = 0, g = 0; j < half; g++) {
            int64_t end = aligned ? j + G : seg_end(j, half, G);
            int64_t glo = aligned ? g : j / G, ghi = aligned ? half / G + g : (half + j) / G;
            vec blo[4], bhi[4], lo, hi;
            for (int r = 0; r < 4; r++) {
                blo[r] = vset1(a[r] * QS(L, sc[r], glo));
                bhi[r] = vset1(a[r] * QS(L, sc[r], ghi));
            }
            for (int64_t i = j; i < end; i += VW) {
                PF(i)
                vec yl = vloadf(y + i), yh = vloadf(y + half + i);
                for (int r = 0; r < 4; r++) {
                    vcodes4(c[r] + i, &lo, &hi);
                    yl = vfmadd(lo, blo[r], yl);
                    yh = vfmadd(hi, bhi[r], yh);
                }
                vstoref(y + i, yl);
                vstoref(y + half + i, yh);
            }
            j = end;
        }
    }
#undef PF
    for (int r = 0; r < 4; r++) qoffsets_axpy(sc[r], of[r], L, a[r], og);
}
#endif

/* ---- int8 activations (AVX-512 VNNI): quantized rows' dot products in integers ----
 * x is quantized once per call to int8 in blocks of 32 elements (d_b = max |x| / 127 over block b,
 * as llama.cpp's Q8_0), and every 64 bytes of codes go through one vpdpbusd (unsigned codes times
 * signed activations, four products summed per 32-bit lane: lanes 0-7 hold block 2p's sum, 8-15
 * block 2p+1's), widened to float and scaled by d_b once per 64 codes instead of converting each
 * code. Signed int8 codes are read as unsigned (xor 0x80: code + 128) and 128 * sum_b d_b * sum(xq_b)
 * is subtracted after; the offsets' part (int4, asymmetric int8) takes the quantized x's group sums,
 * so the result is the dequantized rows times the quantized x (flashio.kernels.int8_activations).
 * Taken when dim % 64 == 0, group 32 or a multiple of 64 and, for int4, (dim / 2) % 64 == 0 (vnni_ok). */
#if FLASHIO_AVX512 && defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define FLASHIO_VNNI 1
#define QB 32

typedef struct {
    int8_t *q;   /* [dim] */
    float *dv;   /* [dim / 64][16]: d of the pair's two blocks, eight lanes each */
    float *gs;   /* [dim / group]: sum over the group's blocks of d_b * sum(xq_b) */
    int32_t *gb; /* [dim / 32]: the group of block b */
} qx;

static int vnni_ok(const qlayout *L) {
    return L->dim % 64 == 0 && (L->group == QB || L->group % 64 == 0) && (L->bits == 8 || (L->dim / 2) % 64 == 0);
}

/* X from x (len % 64 == 0, group % 32 == 0); buf: at least len + len * 2 + len / group * 4 + len / 8 bytes,
 * 64-byte aligned */
static qx quantize_x(const float *x, int64_t len, int64_t group, uint8_t *buf) {
    qx X = {NULL, NULL, NULL, NULL};
    X.dv = (float *)buf;
    X.q = (int8_t *)(buf + len * 1);
    X.gs = (float *)(buf + len * 2);
    X.gb = (int32_t *)(buf + len * 2 + len / group * 4);
    /* dv: len / 4 floats = len bytes; q: len bytes */
    for (int64_t g = 0; g < len / group; g++) X.gs[g] = 0.0f;
    for (int64_t b = 0; b < len / QB; b++) {
        const float *xb = x + b * QB;
        float amax = 0.0f;
        for (int i = 0; i < QB; i++) amax = fmaxf(amax, fabsf(xb[i]));
        float d = amax / 127.0f, id = amax > 0.0f ? 127.0f / amax : 0.0f;
        int32_t sum = 0;
        for (int i = 0; i < QB; i++) {
            int32_t v = (int32_t)nearbyintf(xb[i] * id);
            v = v > 127 ? 127 : (v < -127 ? -127 : v);
            X.q[b * QB + i] = (int8_t)v;
            sum += v;
        }
        for (int i = 0; i < 8; i++) X.dv[(b / 2) * 16 + (b % 2) * 8 + i] = d;
        X.gb[b] = (int32_t)(b * QB / group);
        X.gs[X.gb[b]] += d * (float)sum;
    }
    return X;
}

static inline __m512 h16x1(const qlayout *L, const uint8_t *sc, int64_t g) {
    return _mm512_set1_ps(QS(L, sc, g));
}

/* [s_{g0} x 8, s_{g0+1} x 8] */
static inline __m512 h16x2(const qlayout *L, const uint8_t *sc, int64_t g0) {
    __m128 f;
    if (L->super) {
        f = _mm_castsi128_ps(_mm_loadl_epi64((const __m128i *)(sc + 4 * g0)));
    } else {
        uint32_t ab;
        memcpy(&ab, sc + 2 * g0, 4);
        f = _mm_cvtph_ps(_mm_cvtsi32_si128((int)ab));
    }
    return _mm512_permutexvar_ps(_mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0),
                                 _mm512_castps128_ps512(f));
}

#define DP(c, xq) _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(_mm512_setzero_si512(), (c), (xq)))

/* out[r] = sum_k code_k * scale_g * xq_k * d_b over nr (<= 4) rows, without the offsets' part */
static inline void vnni_rows(int nr, const uint8_t *const *row, const uint8_t *const *scs, const batch *pf,
                             const qlayout *L, const qx *X, float *out) {
    const int64_t extra = (L->dim / L->group) * (L->offsets >= 0 ? 4 : 2);
    const int64_t G = L->group, half = L->dim / 2;
    const int int4 = L->bits == 4, flip = L->bits == 8 && L->offsets < 0;
    const int64_t nbytes = int4 ? half : L->dim;
    const __m512i m4 = _mm512_set1_epi8(15), x80 = _mm512_set1_epi8((char)0x80);
    __m512 tot[4], alo[4], ahi[4];
    for (int r = 0; r < nr; r++) tot[r] = alo[r] = ahi[r] = _mm512_setzero_ps();
    if (G == QB) { /* two groups in each 64 codes: a scale per eight lanes */
        for (int64_t j = 0; j < nbytes; j += 64) {
            for (int r = 0; r < pf->n; r++) {
                PREFETCH(pf->row[r] + L->codes + j);
                if (j < extra) PREFETCH(pf->row[r] + L->codes + nbytes + j);
            }
            const int64_t blo = j / QB, bhi = (half + j) / QB;
            const __m512i xl = _mm512_loadu_si512(X->q + j);
            const __m512 dl = _mm512_loadu_ps(X->dv + j / 4);
            __m512i xh = xl;
            __m512 dh = dl;
            if (int4) xh = _mm512_loadu_si512(X->q + half + j), dh = _mm512_loadu_ps(X->dv + (half + j) / 4);
            for (int r = 0; r < nr; r++) {
                const uint8_t *sc = scs[r];
                __m512i c = _mm512_loadu_si512(row[r] + L->codes + j);
                if (int4) {
                    __m512i lo = _mm512_and_si512(c, m4), hi = _mm512_and_si512(_mm512_srli_epi16(c, 4), m4);
                    tot[r] = _mm512_fmadd_ps(DP(lo, xl), _mm512_mul_ps(dl, h16x2(L, sc, blo)), tot[r]);
                    tot[r] = _mm512_fmadd_ps(DP(hi, xh), _mm512_mul_ps(dh, h16x2(L, sc, bhi)), tot[r]);
                } else {
                    if (flip) c = _mm512_xor_si512(c, x80);
                    tot[r] = _mm512_fmadd_ps(DP(c, xl), _mm512_mul_ps(dl, h16x2(L, sc, blo)), tot[r]);
                }
            }
        }
    } else { /* groups of 64 or more: each 64 codes in one group, its scale applied when the group ends */
        int64_t glo = X->gb[0], ghi = X->gb[half / QB];
        for (int64_t j = 0; j < nbytes; j += 64) {
            for (int r = 0; r < pf->n; r++) {
                PREFETCH(pf->row[r] + L->codes + j);
                if (j < extra) PREFETCH(pf->row[r] + L->codes + nbytes + j);
            }
            const int64_t gl = X->gb[j / QB], gh = int4 ? X->gb[(half + j) / QB] : 0;
            if (gl != glo) {
                for (int r = 0; r < nr; r++)
                    tot[r] = _mm512_fmadd_ps(alo[r], h16x1(L, scs[r], glo), tot[r]), alo[r] = _mm512_setzero_ps();
                glo = gl;
            }
            if (int4 && gh != ghi) {
                for (int r = 0; r < nr; r++)
                    tot[r] = _mm512_fmadd_ps(ahi[r], h16x1(L, scs[r], ghi), tot[r]), ahi[r] = _mm512_setzero_ps();
                ghi = gh;
            }
            const __m512i xl = _mm512_loadu_si512(X->q + j);
            const __m512 dl = _mm512_loadu_ps(X->dv + j / 4);
            if (int4) {
                const __m512i xh = _mm512_loadu_si512(X->q + half + j);
                const __m512 dh = _mm512_loadu_ps(X->dv + (half + j) / 4);
                for (int r = 0; r < nr; r++) {
                    __m512i c = _mm512_loadu_si512(row[r] + L->codes + j);
                    alo[r] = _mm512_fmadd_ps(DP(_mm512_and_si512(c, m4), xl), dl, alo[r]);
                    ahi[r] = _mm512_fmadd_ps(DP(_mm512_and_si512(_mm512_srli_epi16(c, 4), m4), xh), dh, ahi[r]);
                }
            } else {
                for (int r = 0; r < nr; r++) {
                    __m512i c = _mm512_loadu_si512(row[r] + L->codes + j);
                    if (flip) c = _mm512_xor_si512(c, x80);
                    alo[r] = _mm512_fmadd_ps(DP(c, xl), dl, alo[r]);
                }
            }
        }
        for (int r = 0; r < nr; r++) {
            tot[r] = _mm512_fmadd_ps(alo[r], h16x1(L, scs[r], glo), tot[r]);
            if (int4) tot[r] = _mm512_fmadd_ps(ahi[r], h16x1(L, scs[r], ghi), tot[r]);
        }
    }
    for (int r = 0; r < nr; r++) {
        float s = _mm512_reduce_add_ps(tot[r]);
        if (flip) s -= 128.0f * dot1(scs[r], X->gs, L->dim / G, 1);
        out[r] = s;
    }
}
#endif

static int use_vnni(const qlayout *L) {
#if defined(FLASHIO_VNNI)
    return vnni_ok(L);
#else
    (void)L;
    return 0;
#endif
}

/* Whether a part of `dim` elements in groups of `group` takes the int8-activation path (1) or
 * float activations (0), for `bits` 8 or 4 */
int flashio_q8_path(int64_t dim, int bits, int64_t group) {
    qlayout L = {0, dim, group, 0, 0, -1, bits, 0};
    return use_vnni(&L);
}

/* out[n] = sum_k x[k] * element_k of row n, for the part laid out at codes/scales/offsets */
/* out[n] = sum_k x[k] * element_k of row n, for the part laid out at codes/scales/offsets; rows whose
 * mask is 0 (mask may be NULL) are not read and get 0 */
static void qdot_1(const uint8_t *rows, int64_t row_bytes, int64_t n_rows, int64_t dim, int bits, int64_t group,
                  int64_t codes, int64_t scales, int64_t offsets, int64_t super, const float *mask, const float *x,
                  float *xg, float *out) {
    qlayout L = qmake(row_bytes, dim, bits, group, codes, scales, offsets, super);
    float dec[super ? 8 * (dim / group) : 8]; /* four rows' decoded scales and offsets (two-level, in the codes) */
    for (int64_t g = 0; g < dim / group; g++) {
        float t = 0.0f;
        for (int64_t k = g * group; k < (g + 1) * group; k++) t += x[k];
        xg[g] = t;
    }
    if (mask)
        for (int64_t n = 0; n < n_rows; n++)
            if (mask[n] == 0.0f) out[n] = 0.0f; /* rows not read */
    uint8_t *buf = NULL; /* int8 activations (VNNI builds), the next rows prefetched */
#if defined(FLASHIO_VNNI)
    qx X = {NULL, NULL, NULL, NULL};
    if (vnni_ok(&L) && (buf = malloc((size_t)(2 * dim + 4 * dim / group + dim / 8))) != NULL)
        X = quantize_x(x, dim, group, buf);
#endif
    int64_t pos = 0, idx[4], nidx[4];
    float o[4];
    const uint8_t *sc[4], *of[4];
#if defined(FLASHIO_VNNI)
    /* int8 rows of one part, every row read (resident rows: the token embeddings and a tied head
     * through them): a row at a time in order, no prefetch, the stream the hardware prefetches best
     * (as i8_matvec_1). Gemma 3 270M's 262144 x 640 head: 7.4 against 10.7 ms on two threads, 14.0
     * against 20.8 on one; two-part rows (the FFN's up of up + down) ran at half the speed this way,
     * and int4 one-part rows gained on two threads and lost on one (two-level 1.44 against 0.88 ms) */
    if (buf && !mask && bits == 8 && 2 * dim > row_bytes) {
        const batch none = {{0, 0, 0, 0}, 0};
        for (int64_t n = 0; n < n_rows; n++) {
            const uint8_t *r = rows + n * row_bytes;
            qptrs(r, &L, dec, sc, of);
            vnni_rows(1, &r, sc, &none, &L, &X, o);
            out[n] = o[0] + qoffsets_dot(sc[0], of[0], &L, X.gs);
        }
        free(buf);
        return;
    }
#endif
    batch cur = take4(rows, row_bytes, mask, &pos, n_rows, idx);
    while (cur.n > 0) {
        batch next = take4(rows, row_bytes, mask, &pos, n_rows, nidx);
        for (int i = 0; i < cur.n; i++) qptrs(cur.row[i], &L, dec + i * 2 * (super ? dim / group : 1), sc + i, of + i);
#if defined(FLASHIO_VNNI)
        if (buf) {
            if (cur.n == 4)
                vnni_rows(4, cur.row, sc, &next, &L, &X, o);
            else
                for (int i = 0; i < cur.n; i++) vnni_rows(1, cur.row + i, sc + i, &next, &L, &X, o + i);
            for (int i = 0; i < cur.n; i++) o[i] += qoffsets_dot(sc[i], of[i], &L, X.gs);
        } else
#endif
#if defined(VW)
        if (cur.n == 4 && qvector_ok(&L))
            qdot4(cur.row, sc, of, &L, x, xg, o);
        else
#endif
            for (int i = 0; i < cur.n; i++) o[i] = qdot1(cur.row[i], sc[i], of[i], &L, x, xg);
        for (int i = 0; i < cur.n; i++) out[idx[i]] = o[i];
        cur = next;
        memcpy(idx, nidx, sizeof idx);
    }
    free(buf);
}

/* y[k] = sum_n a[n] * element_k of row n; rows with a[n] == 0 are not read. og: dim / group scratch */
static void qaxpy_1(const uint8_t *rows, int64_t row_bytes, int64_t n_rows, int64_t dim, int bits, int64_t group,
                   int64_t codes, int64_t scales, int64_t offsets, int64_t super, const float *a, float *og, float *y) {
    qlayout L = qmake(row_bytes, dim, bits, group, codes, scales, offsets, super);
    int64_t ng = dim / group;
    memset(y, 0, (size_t)dim * sizeof(float));
    memset(og, 0, (size_t)ng * sizeof(float));
    float dec[super ? 8 * ng : 8]; /* four rows' decoded scales and offsets (two-level, in the codes) */
    int64_t pos = 0, idx[4], nidx[4];
    const uint8_t *sc[4], *of[4];
    batch cur = take4(rows, row_bytes, a, &pos, n_rows, idx); /* inactive neurons (a == 0): not read */
    while (cur.n > 0) {
        batch next = take4(rows, row_bytes, a, &pos, n_rows, nidx);
        float c[4];
        for (int i = 0; i < cur.n; i++) {
            c[i] = a[idx[i]];
            qptrs(cur.row[i], &L, dec + i * 2 * (super ? ng : 1), sc + i, of + i);
        }
#if defined(VW)
        if (cur.n == 4 && qvector_ok(&L))
            qaxpy4(cur.row, sc, of, &L, c, y, og, &next);
        else
#endif
            for (int i = 0; i < cur.n; i++) qaxpy1(cur.row[i], sc[i], of[i], &L, c[i], y, og);
        cur = next;
        memcpy(idx, nidx, sizeof idx);
    }
    if (L.offsets >= 0 || L.sym4)
        for (int64_t k = 0; k < dim; k++) y[k] += og[k / group];
}

/* ---- resident int8 matrices (flashio.quant.QuantizedWeight): out[n] = scale_n * sum_k codes[n, k] x[k],
 * codes [n_rows, len] int8 contiguous, scales [n_rows] fp16 ---- */
static void i8_matvec_1(const int8_t *codes, int64_t n_rows, int64_t len, const uint16_t *scales, const float *x,
                       float *out) {
    int64_t n = 0;
#if defined(FLASHIO_VNNI)
    uint8_t *buf = len % 64 == 0 ? malloc((size_t)(2 * len + 4 + len / 8)) : NULL;
    if (buf) { /* int8 activations (see vnni_rows); a row at a time: the matrix is read in order, the stream
                * the hardware prefetches best (four rows at once, four streams, ran at half the speed) */
        qx X = quantize_x(x, len, len, buf);
        const __m512i x80 = _mm512_set1_epi8((char)0x80);
        for (; n < n_rows; n++) {
            __m512 a0 = _mm512_setzero_ps(), a1 = a0;
            const int8_t *c = codes + n * len;
            int64_t k = 0;
#define I8STEP(acc, k) \
    acc = _mm512_fmadd_ps(DP(_mm512_xor_si512(_mm512_loadu_si512(c + (k)), x80), _mm512_loadu_si512(X.q + (k))), \
                          _mm512_loadu_ps(X.dv + (k) / 4), acc)
            for (; k + 128 <= len; k += 128) {
                I8STEP(a0, k);
                I8STEP(a1, k + 64);
            }
            for (; k < len; k += 64) I8STEP(a0, k);
#undef I8STEP
            out[n] = (_mm512_reduce_add_ps(_mm512_add_ps(a0, a1)) - 128.0f * X.gs[0]) * HALF(scales[n]);
        }
        free(buf);
        return;
    }
#endif
#if defined(VW)
    for (; n + 4 <= n_rows; n += 4) {
        const uint8_t *c[4];
        vec acc[4] = {vzero(), vzero(), vzero(), vzero()};
        for (int r = 0; r < 4; r++) c[r] = (const uint8_t *)(codes + (n + r) * len);
        int64_t k = 0;
        for (; k + VW <= len; k += VW) {
            vec xv = vloadf(x + k);
            for (int r = 0; r < 4; r++) acc[r] = vfmadd(vcodes8(c[r] + k, 1), xv, acc[r]);
        }
        for (int r = 0; r < 4; r++) {
            float s = vsum(acc[r]);
            for (int64_t j = k; j < len; j++) s += (float)(int8_t)c[r][j] * x[j];
            out[n + r] = s * HALF(scales[n + r]);
        }
    }
#endif
    for (; n < n_rows; n++) {
        float s = 0.0f;
        for (int64_t k = 0; k < len; k++) s += (float)codes[n * len + k] * x[k];
        out[n] = s * HALF(scales[n]);
    }
}

/* ---- compute threads: one kernel call's rows split over the calling thread and workers ----
 * A matrix-vector product is bound by the memory's speed, and one core does not reach it (this
 * project's 2-core machines: fp16 products ~33 GB/s on one thread, ~46 on two). flashio_set_threads(n)
 * keeps n - 1 worker threads. Each public kernel below cuts its rows into chunks of about equal work
 * (rows a mask or coefficient skips do not count; up to CHUNKS_PER_THREAD per thread, none under
 * CHUNK_BYTES) and the caller and the workers take chunks until none is left: a worker that is not
 * running (another process has its core) costs nothing but the chunks the caller then computes. The
 * caller waits only for chunks a worker has taken. Chunks that sum into one vector (the down
 * products) each fill their own, added in chunk order: a result depends on the thread count only
 * through that float rounding, and is the same from run to run. A worker waits for the next call
 * spinning for FLASHIO_SPIN_US microseconds (default 50: a layer's calls come tens of microseconds
 * apart), then sleeps on a futex. One call is split at a time; a call from another thread meanwhile
 * computes alone. After fork() the child has no workers. */
#include <pthread.h>
#include <stdatomic.h>
#include <sched.h>
#include <time.h>
#include <limits.h>
#include <linux/futex.h>
#include <sys/syscall.h>

#define POOL_MAX 64
#define CHUNKS_PER_THREAD 4
#define CHUNKS_MAX (POOL_MAX * CHUNKS_PER_THREAD)
#define CHUNK_BYTES (128 * 1024)

typedef void (*chunk_fn)(void *job, int chunk);

static struct {
    pthread_mutex_t lock; /* held by a split call, and while the workers change */
    int threads;          /* the caller + workers */
    pthread_t tid[POOL_MAX];
    atomic_uint gen;      /* bumped for each call: the workers wait for it to move (futex word) */
    unsigned base;        /* gen when the workers were started */
    /* the call's chunks: call number << 32 | chunks << 16 | next chunk; taken by compare-and-swap,
     * so a chunk is taken once and only while its call is the current one */
    atomic_ullong claim;
    atomic_int done;      /* chunks finished */
    atomic_int sleeping;
    atomic_int stop;
    long spin_ns;
    chunk_fn fn; /* the current call's (valid while one of its chunks is unfinished) */
    void *job;
} pool = {.lock = PTHREAD_MUTEX_INITIALIZER, .threads = 1, .spin_ns = 50000};

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

static long now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000000000L + t.tv_nsec;
}

/* take and compute chunks of the current call until none is left */
static void take_chunks(void) {
    for (;;) {
        unsigned long long c = atomic_load_explicit(&pool.claim, memory_order_acquire);
        if ((c & 0xffff) >= ((c >> 16) & 0xffff)) return;
        if (!atomic_compare_exchange_weak_explicit(&pool.claim, &c, c + 1, memory_order_acq_rel,
                                                   memory_order_acquire))
            continue;
        pool.fn(pool.job, (int)(c & 0xffff));
        atomic_fetch_add_explicit(&pool.done, 1, memory_order_release);
    }
}

static void *pool_worker(void *arg) {
    (void)arg;
    unsigned seen = pool.base;
    for (;;) {
        unsigned g;
        long start = now_ns();
        int spins = 0;
        while ((g = atomic_load_explicit(&pool.gen, memory_order_acquire)) == seen) {
            if (++spins % 256 == 0 && now_ns() - start > pool.spin_ns) {
                atomic_fetch_add(&pool.sleeping, 1);
                syscall(SYS_futex, (unsigned *)&pool.gen, FUTEX_WAIT_PRIVATE, seen, NULL, NULL, 0);
                atomic_fetch_sub(&pool.sleeping, 1);
                start = now_ns();
            }
            cpu_relax();
        }
        seen = g;
        if (atomic_load(&pool.stop)) return NULL;
        take_chunks();
    }
}

static void pool_stop(void) { /* with the lock held */
    if (pool.threads <= 1) return;
    atomic_store(&pool.stop, 1);
    atomic_fetch_add(&pool.gen, 1);
    syscall(SYS_futex, (unsigned *)&pool.gen, FUTEX_WAKE_PRIVATE, INT_MAX, NULL, NULL, 0);
    for (int i = 1; i < pool.threads; i++) pthread_join(pool.tid[i], NULL);
    atomic_store(&pool.stop, 0);
    pool.threads = 1;
}

static void pool_after_fork(void) { /* the child: one thread, whatever the parent was doing */
    pthread_mutex_init(&pool.lock, NULL);
    pool.threads = 1;
    atomic_store(&pool.sleeping, 0);
    atomic_store(&pool.stop, 0);
}

__attribute__((constructor)) static void pool_init(void) { pthread_atfork(NULL, NULL, pool_after_fork); }

/* Use n threads (the caller and n - 1 workers) for the kernels' calls; returns how many there are
 * (fewer when workers cannot be started; 1..POOL_MAX). */
int flashio_set_threads(int n) {
    if (n < 1) n = 1;
    if (n > POOL_MAX) n = POOL_MAX;
    pthread_mutex_lock(&pool.lock);
    if (n != pool.threads) {
        pool_stop();
        const char *spin = getenv("FLASHIO_SPIN_US");
        if (spin && *spin) pool.spin_ns = atol(spin) * 1000L;
        pool.base = atomic_load(&pool.gen);
        for (int i = 1; i < n; i++) {
            if (pthread_create(&pool.tid[i], NULL, pool_worker, NULL) != 0) break;
            pool.threads = i + 1;
        }
    }
    int got = pool.threads;
    pthread_mutex_unlock(&pool.lock);
    return got;
}

int flashio_threads(void) { return pool.threads; }

/* fn(job, c) for every chunk c in 0..chunks-1, on the caller and the workers */
static void run_chunks(chunk_fn fn, void *job, int chunks) {
    if (chunks <= 1 || pool.threads <= 1 || pthread_mutex_trylock(&pool.lock) != 0) {
        for (int c = 0; c < chunks; c++) fn(job, c);
        return;
    }
    static unsigned long long calls;
    pool.fn = fn, pool.job = job;
    atomic_store(&pool.done, 0);
    atomic_store(&pool.claim, (++calls & 0xffffffffULL) << 32 | (unsigned long long)chunks << 16);
    atomic_fetch_add(&pool.gen, 1); /* seq_cst: a worker going to sleep sees it, or is counted below */
    if (atomic_load(&pool.sleeping) > 0)
        syscall(SYS_futex, (unsigned *)&pool.gen, FUTEX_WAKE_PRIVATE, INT_MAX, NULL, NULL, 0);
    take_chunks();
    for (int spins = 0; atomic_load_explicit(&pool.done, memory_order_acquire) < chunks;)
        if (++spins % 4096 == 0)
            sched_yield();
        else
            cpu_relax();
    pthread_mutex_unlock(&pool.lock);
}

/* How many chunks `bytes` of rows make: 1 (not split) with one thread or too little work. */
static int chunks_for(int64_t bytes) {
    if (pool.threads <= 1) return 1;
    int64_t c = bytes / CHUNK_BYTES, most = (int64_t)pool.threads * CHUNKS_PER_THREAD;
    return c < 2 ? 1 : c > most ? (int)most : (int)c;
}

/* bounds[0..parts]: row ranges of about equal work; w (NULL: every row counts) skips zero rows,
 * `total` of them counted (live_rows). Every range but the last holds a multiple of 4 counted rows:
 * the kernels take rows four at a time (take4), so each row is computed by the same code, in the
 * same order, as without a split. */
static void split_rows(int64_t n_rows, const float *w, int64_t total, int parts, int64_t *bounds) {
    bounds[0] = 0, bounds[parts] = n_rows;
    if (!w) {
        for (int p = 1; p < parts; p++) bounds[p] = (n_rows * p / parts) & ~(int64_t)3;
        return;
    }
    int p = 1;
    int64_t seen = 0;
    for (int64_t n = 0; n < n_rows && p < parts; n++) {
        while (p < parts && seen >= ((total * p / parts) & ~(int64_t)3)) bounds[p++] = n;
        seen += w[n] != 0.0f;
    }
    while (p < parts) bounds[p++] = n_rows;
}

/* rows counted by w (NULL: all) */
static int64_t live_rows(int64_t n_rows, const float *w) {
    if (!w) return n_rows;
    int64_t c = 0;
    for (int64_t n = 0; n < n_rows; n++) c += w[n] != 0.0f;
    return c;
}


typedef struct {
    const char *rows;
    int64_t stride, len, row_bytes, up, gate, down, dim, group, codes, scales, offsets, super;
    int dtype, act, bits;
    const float *x, *a_in, *b_up, *b_gate, *gate_act, *mask;
    const uint16_t *hscales;
    float *out, *a, *y, *scratch, *xg_scratch;
    int64_t bounds[CHUNKS_MAX + 1];
} job_t;

#define PART_RANGE(j, p) int64_t lo = (j)->bounds[p], cnt = (j)->bounds[(p) + 1] - lo
#define PART_Y(j, p) ((p) == 0 ? (j)->y : (j)->scratch + ((p) - 1) * (j)->len)
#define OPT(v, lo) ((v) ? (v) + (lo) : NULL)

/* The chunks of a product whose chunks each fill a vector (chunk 0 j->y, chunk p > 0 row p - 1 of
 * j->scratch): rows split by w (`live` of them counted), run, the vectors added into j->y in
 * chunk order. */
static void run_summed(chunk_fn fn, job_t *j, int64_t n_rows, const float *w, int64_t live, int parts) {
    split_rows(n_rows, w, live, parts, j->bounds);
    run_chunks(fn, j, parts);
    for (int p = 1; p < parts; p++)
        for (int64_t k = 0; k < j->len; k++) j->y[k] += j->scratch[(p - 1) * j->len + k];
}

static void dot_part(void *v, int p) {
    job_t *j = v;
    PART_RANGE(j, p);
    if (cnt > 0) dot_1(j->rows + lo * j->row_bytes, j->stride, cnt, j->len, j->dtype, j->x, j->out + lo);
}

void flashio_dot(const void *rows, int64_t stride, int64_t n_rows, int64_t len, int dtype, const float *x, float *out) {
    int64_t size = dtype == 0 ? 4 : 2;
    int parts = chunks_for(n_rows * len * size);
    if (parts == 1) {
        dot_1(rows, stride, n_rows, len, dtype, x, out);
        return;
    }
    job_t j = {.rows = rows, .stride = stride, .len = len, .row_bytes = stride * size, .dtype = dtype, .x = x, .out = out};
    split_rows(n_rows, NULL, n_rows, parts, j.bounds);
    run_chunks(dot_part, &j, parts);
}

static void axpy_part(void *v, int p) {
    job_t *j = v;
    PART_RANGE(j, p);
    axpy_1(j->rows + lo * j->row_bytes, j->stride, cnt, j->len, j->dtype, j->a_in + lo, PART_Y(j, p));
}

void flashio_axpy(const void *rows, int64_t stride, int64_t n_rows, int64_t len, int dtype, const float *a, float *y) {
    int64_t size = dtype == 0 ? 4 : 2;
    int64_t live = live_rows(n_rows, a);
    int parts = chunks_for(live * len * size);
    float *scratch = parts > 1 ? malloc((size_t)(parts - 1) * len * sizeof(float)) : NULL;
    if (!scratch) {
        axpy_1(rows, stride, n_rows, len, dtype, a, y);
        return;
    }
    job_t j = {.rows = rows, .stride = stride, .len = len, .row_bytes = stride * size, .dtype = dtype, .a_in = a,
               .y = y, .scratch = scratch};
    run_summed(axpy_part, &j, n_rows, a, live, parts);
    free(scratch);
}

static void ffn_part(void *v, int p) {
    job_t *j = v;
    PART_RANGE(j, p);
    ffn_1(j->rows + lo * j->row_bytes, j->stride, cnt, j->len, j->dtype, j->up, j->gate, j->down, j->act, j->x,
          OPT(j->b_up, lo), OPT(j->b_gate, lo), OPT(j->gate_act, lo), OPT(j->mask, lo), j->a + lo, PART_Y(j, p));
}

void flashio_ffn(const void *rows, int64_t stride, int64_t n_rows, int64_t len, int dtype, int64_t up,
                 int64_t gate, int64_t down, int act, const float *x, const float *b_up, const float *b_gate,
                 const float *gate_act, const float *mask, float *a, float *y) {
    int64_t size = dtype == 0 ? 4 : 2;
    int64_t live = live_rows(n_rows, mask);
    int parts = chunks_for(live * len * size * (gate >= 0 ? 3 : 2));
    float *scratch = parts > 1 ? malloc((size_t)(parts - 1) * len * sizeof(float)) : NULL;
    if (!scratch) {
        ffn_1(rows, stride, n_rows, len, dtype, up, gate, down, act, x, b_up, b_gate, gate_act, mask, a, y);
        return;
    }
    job_t j = {.rows = rows, .stride = stride, .len = len, .row_bytes = stride * size, .dtype = dtype, .up = up,
               .gate = gate, .down = down, .act = act, .x = x, .b_up = b_up, .b_gate = b_gate, .gate_act = gate_act,
               .mask = mask, .a = a, .y = y, .scratch = scratch};
    run_summed(ffn_part, &j, n_rows, mask, live, parts);
    free(scratch);
}

static void qdot_part(void *v, int p) {
    job_t *j = v;
    PART_RANGE(j, p);
    qdot_1((const uint8_t *)j->rows + lo * j->row_bytes, j->row_bytes, cnt, j->dim, j->bits, j->group, j->codes,
           j->scales, j->offsets, j->super, OPT(j->mask, lo), j->x, j->xg_scratch + p * (j->dim / j->group),
           j->out + lo);
}

void flashio_qdot(const uint8_t *rows, int64_t row_bytes, int64_t n_rows, int64_t dim, int bits, int64_t group,
                  int64_t codes, int64_t scales, int64_t offsets, int64_t super, const float *mask, const float *x,
                  float *xg, float *out) {
    int64_t live = live_rows(n_rows, mask);
    int parts = chunks_for(live * (dim * bits / 8)); /* the work: the part's codes */
    float *scratch = parts > 1 ? malloc((size_t)parts * (dim / group) * sizeof(float)) : NULL;
    if (!scratch) {
        qdot_1(rows, row_bytes, n_rows, dim, bits, group, codes, scales, offsets, super, mask, x, xg, out);
        return;
    }
    job_t j = {.rows = (const char *)rows, .row_bytes = row_bytes, .dim = dim, .bits = bits, .group = group,
               .codes = codes, .scales = scales, .offsets = offsets, .super = super, .mask = mask, .x = x,
               .out = out, .xg_scratch = scratch};
    split_rows(n_rows, mask, live, parts, j.bounds);
    run_chunks(qdot_part, &j, parts);
    memcpy(xg, scratch, (size_t)(dim / group) * sizeof(float));
    free(scratch);
}

static void qaxpy_part(void *v, int p) {
    job_t *j = v;
    PART_RANGE(j, p);
    qaxpy_1((const uint8_t *)j->rows + lo * j->row_bytes, j->row_bytes, cnt, j->dim, j->bits, j->group, j->codes,
            j->scales, j->offsets, j->super, j->a_in + lo, j->xg_scratch + p * (j->dim / j->group), PART_Y(j, p));
}

void flashio_qaxpy(const uint8_t *rows, int64_t row_bytes, int64_t n_rows, int64_t dim, int bits, int64_t group,
                   int64_t codes, int64_t scales, int64_t offsets, int64_t super, const float *a, float *og, float *y) {
    int64_t live = live_rows(n_rows, a);
    int parts = chunks_for(live * (dim * bits / 8)); /* the work: the part's codes */
    float *scratch = parts > 1 ? malloc((size_t)(parts - 1) * dim * sizeof(float) +
                                        (size_t)parts * (dim / group) * sizeof(float))
                               : NULL;
    if (!scratch) {
        qaxpy_1(rows, row_bytes, n_rows, dim, bits, group, codes, scales, offsets, super, a, og, y);
        return;
    }
    job_t j = {.rows = (const char *)rows, .row_bytes = row_bytes, .len = dim, .dim = dim, .bits = bits,
               .group = group, .codes = codes, .scales = scales, .offsets = offsets, .super = super, .a_in = a, .y = y,
               .scratch = scratch, .xg_scratch = scratch + (parts - 1) * dim};
    run_summed(qaxpy_part, &j, n_rows, a, live, parts);
    memcpy(og, j.xg_scratch, (size_t)(dim / group) * sizeof(float));
    free(scratch);
}

static void i8_part(void *v, int p) {
    job_t *j = v;
    PART_RANGE(j, p);
    if (cnt > 0)
        i8_matvec_1((const int8_t *)j->rows + lo * j->len, cnt, j->len, j->hscales + lo, j->x, j->out + lo);
}

void flashio_i8_matvec(const int8_t *codes, int64_t n_rows, int64_t len, const uint16_t *scales, const float *x,
                       float *out) {
    int parts = chunks_for(n_rows * len);
    if (parts == 1) {
        i8_matvec_1(codes, n_rows, len, scales, x, out);
        return;
    }
    job_t j = {.rows = (const char *)codes, .len = len, .hscales = scales, .x = x, .out = out};
    split_rows(n_rows, NULL, n_rows, parts, j.bounds);
    run_chunks(i8_part, &j, parts);
}

/* One query's attention (decoding): for each of the H query heads, softmax(scale * q_h . k_g,t)
 * over the S keys t of its key/value head g = h / (H / Hk), then the weighted sum of those v_g,t.
 * q: [H, Dh] float32; k, v: the cache's keys and values in `dtype`, head g's key t at
 * k + (g * k_head + t * k_pos) elements (each key's Dh elements contiguous; likewise v); scores:
 * [H, S] float32 scratch; out: [H, Dh] float32. Scores, softmax and sums in float32. Heads are
 * split over the pool's threads when the keys and values are large enough. */
typedef struct {
    const float *q;
    const char *k, *v;
    int64_t H, Hk, Dh, S, k_head, k_pos, v_head, v_pos, heads_per_chunk;
    int dtype;
    float scale;
    float *scores, *out;
} attn_job;

static void attend_heads(const attn_job *j, int64_t h0, int64_t h1) {
    int64_t size = j->dtype == 0 ? 4 : 2, group = j->H / j->Hk;
    for (int64_t h = h0; h < h1; h++) {
        int64_t g = h / group;
        const char *kb = j->k + g * j->k_head * size, *vb = j->v + g * j->v_head * size;
        const float *q = j->q + h * j->Dh;
        float *s = j->scores + h * j->S, *o = j->out + h * j->Dh, m = -INFINITY, sum = 0.0f;
        for (int64_t t = 0; t < j->S; t++) {
            s[t] = j->scale * dot1(kb + t * j->k_pos * size, q, j->Dh, j->dtype);
            if (s[t] > m) m = s[t];
        }
        for (int64_t t = 0; t < j->S; t++) sum += (s[t] = expf(s[t] - m));
        memset(o, 0, (size_t)j->Dh * sizeof(float));
        float inv = 1.0f / sum;
        for (int64_t t = 0; t < j->S; t++) axpy1(o, vb + t * j->v_pos * size, s[t] * inv, j->Dh, j->dtype);
    }
}

static void attend_part(void *v, int p) {
    attn_job *j = v;
    int64_t h0 = p * j->heads_per_chunk, h1 = h0 + j->heads_per_chunk;
    attend_heads(j, h0, h1 < j->H ? h1 : j->H);
}

void flashio_attend1(const float *q, int64_t H, int64_t Hk, int64_t Dh, const void *k, int64_t k_head, int64_t k_pos,
                     const void *v, int64_t v_head, int64_t v_pos, int64_t S, int dtype, float scale, float *scores,
                     float *out) {
    int64_t size = dtype == 0 ? 4 : 2;
    attn_job j = {.q = q, .k = k, .v = v, .H = H, .Hk = Hk, .Dh = Dh, .S = S, .k_head = k_head, .k_pos = k_pos,
                  .v_head = v_head, .v_pos = v_pos, .dtype = dtype, .scale = scale, .scores = scores, .out = out};
    int parts = chunks_for(2 * Hk * S * Dh * size);
    if (parts > H) parts = (int)H;
    if (parts <= 1) {
        attend_heads(&j, 0, H);
        return;
    }
    j.heads_per_chunk = (H + parts - 1) / parts;
    run_chunks(attend_part, &j, (int)((H + j.heads_per_chunk - 1) / j.heads_per_chunk));
}

/* float -> fp16 / bf16, rounding to nearest even (as torch's conversions); fp16 without F16C after
 * the FP16 library's fp16_ieee_from_fp32_value (M. Dukhan, MIT). */
static inline uint16_t float_to_half(float f) {
#if defined(__F16C__)
    return _cvtss_sh(f, 0);
#else
    float base = (fabsf(f) * 0x1.0p+112f) * 0x1.0p-110f;
    uint32_t w, bits;
    memcpy(&w, &f, 4);
    uint32_t shl1 = w + w, sign = w & 0x80000000u, bias = shl1 & 0xff000000u;
    if (bias < 0x71000000u) bias = 0x71000000u;
    uint32_t b = (bias >> 1) + 0x07800000u;
    float bf;
    memcpy(&bf, &b, 4);
    base = bf + base;
    memcpy(&bits, &base, 4);
    uint32_t nonsign = ((bits >> 13) & 0x7c00u) + (bits & 0x0fffu);
    return (uint16_t)((sign >> 16) | (shl1 > 0xff000000u ? 0x7e00u : nonsign));
#endif
}

static inline uint16_t float_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* nan stays nan */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* v rounded to `dtype` (0 float32, 1 fp16, 2 bf16), stored at p[i] */
static inline void store1(void *p, int64_t i, int dtype, float v) {
    if (dtype == 0)
        ((float *)p)[i] = v;
    else
        ((uint16_t *)p)[i] = dtype == 1 ? float_to_half(v) : float_to_bf16(v);
}

static inline float round_to(float v, int dtype) {
    if (dtype == 0) return v;
    return dtype == 1 ? HALF(float_to_half(v)) : bf16_to_float(float_to_bf16(v));
}

/* A low-rank predictor's active neurons for one token (flashio.predictor.PredictorWeights.active):
 * h = A x (A: [r, d]), then s = B h + bias - thr (B: [n, r]), rounded to `dtype` after each step
 * as the torch path rounds it (the products' float32 sums to dtype, the bias added and the
 * threshold, itself rounded to dtype, taken in float32 and rounded again); ids[] = the neurons
 * with s > 0, in order.
 * h (r floats) and z (n floats) are scratch. Returns the number of ids. One call instead of two
 * products and six small torch steps, each slow after the layer's products went through the caches. */
int64_t flashio_predict(const void *A, int64_t r, int64_t d, const void *B, int64_t n, const void *bias, int dtype,
                        const float *x, float thr, float *h, float *z, int64_t *ids) {
    flashio_dot(A, d, r, d, dtype, x, h);
    for (int64_t k = 0; k < r; k++) h[k] = round_to(h[k], dtype);
    flashio_dot(B, r, n, r, dtype, h, z);
    int64_t c = 0;
    thr = round_to(thr, dtype); /* torch casts a Python scalar to the tensor's dtype first */
    /* The roundings move z + bias - thr by at most ~2u (|z| + |bias|) (u: the dtype's unit
     * roundoff), or make a value below the dtype's smallest step zero: outside `rel` x that plus
     * `tiny` the sign is the unrounded sum's, and only the few scores near the threshold take the
     * three roundings (each a conversion to and from fp16/bf16: ~18 ns a neuron for all of them) */
    const float rel = dtype == 0 ? 0x1p-20f : dtype == 1 ? 0x1p-8f : 0x1p-5f, tiny = 0x1p-20f;
    for (int64_t k = 0; k < n; k++) { /* z[k] becomes 1 for a neuron kept, else 0 */
        float b = load1(bias, k, dtype), v = z[k] + b - thr;
        float margin = rel * (fabsf(z[k]) + fabsf(b) + fabsf(thr)) + tiny;
        int keep = v > margin;
        if (__builtin_expect(fabsf(v) <= margin, 0))
            keep = round_to(round_to(round_to(z[k], dtype) + b, dtype) - thr, dtype) > 0.0f;
        z[k] = (float)keep;
    }
    for (int64_t k = 0; k < n; k++) { /* without a branch: about as many kept as not */
        ids[c] = k;
        c += z[k] != 0.0f;
    }
    return c;
}

/* Llama's RMSNorm (transformers' LlamaRMSNorm) of `rows` rows of n elements in `dtype`:
 * out = w * round(x * rsqrt(mean(x^2) + eps)), the mean in double, then as torch: x * r rounded to
 * dtype, times w (dtype) rounded to dtype. */
void flashio_rms(const void *x, int64_t rows, int64_t n, int dtype, const void *w, float eps, void *out) {
    int64_t size = dtype == 0 ? 4 : 2;
    for (int64_t r = 0; r < rows; r++) {
        const char *xr = (const char *)x + r * n * size;
        char *yr = (char *)out + r * n * size;
        double ss = 0.0;
        for (int64_t k = 0; k < n; k++) {
            double v = load1(xr, k, dtype);
            ss += v * v;
        }
        float inv = 1.0f / sqrtf((float)(ss / (double)n) + eps);
        for (int64_t k = 0; k < n; k++)
            store1(yr, k, dtype, load1(w, k, dtype) * round_to(load1(xr, k, dtype) * inv, dtype));
    }
}

/* Rotary embedding of `rows` rows of dh elements (transformers' apply_rotary_pos_emb, one position):
 * out = x * cos + rotate_half(x) * sin, rotate_half(x) = (-x[dh/2:], x[:dh/2]); cos, sin: [dh] in
 * x's dtype. Each product and the sum rounded to dtype, as torch's element-wise ops round them. */
void flashio_rope(const void *x, int64_t rows, int64_t dh, int dtype, const void *cos, const void *sin, void *out) {
    int64_t size = dtype == 0 ? 4 : 2, half = dh / 2;
    for (int64_t r = 0; r < rows; r++) {
        const char *xr = (const char *)x + r * dh * size;
        char *yr = (char *)out + r * dh * size;
        for (int64_t j = 0; j < dh; j++) {
            float rot = j < half ? -load1(xr, j + half, dtype) : load1(xr, j - half, dtype);
            float a = round_to(load1(xr, j, dtype) * load1(cos, j, dtype), dtype);
            float b = round_to(rot * load1(sin, j, dtype), dtype);
            store1(yr, j, dtype, a + b);
        }
    }
}

/* Which build this is: 512, 256 (AVX2) or 0 (portable). */
int flashio_vector_bits(void) {
#if FLASHIO_AVX512
    return 512;
#elif FLASHIO_AVX2
    return 256;
#else
    return 0;
#endif
}

/* readplan.scatter_tables' tables in one pass: the n sorted unique row ids `ids` of a layer whose
 * rows (row_bytes each) start at file offset `base`, read into out's rows rows[j]. Ids whose rows
 * lie at most max_gap apart share a run, cut into pieces of at most max_rows rows (pieces without
 * an id are dropped); piece p reads nbytes[p] bytes at offs[p] into the iovecs first[p] ..
 * first[p + 1], iovec e lens[e] bytes to out's byte dest[e] or to scratch (dest[e] = -1: rows read
 * through). An id whose out row follows the previous one's extends its iovec. Capacities: n
 * pieces, 3n iovecs (a gap, the row, a tail per id), first n + 1. Returns the pieces. */
int64_t flashio_scatter_tables(const int64_t *ids, const int64_t *rows, int64_t n, int64_t row_bytes, int64_t base,
                               int64_t max_gap, int64_t max_rows, int64_t *offs, int64_t *nbytes, int64_t *first,
                               int64_t *dest, int64_t *lens) {
    int64_t P = 0, V = 0, j = 0;
    if (max_rows < 1) max_rows = 1;
    while (j < n) {
        int64_t e = j; /* the run's last id */
        while (e + 1 < n && ids[e + 1] - ids[e] - 1 <= max_gap) e++;
        int64_t run_stop = ids[e] + 1;
        for (int64_t lo = ids[j]; lo < run_stop && j <= e; lo += max_rows) {
            int64_t hi = lo + max_rows < run_stop ? lo + max_rows : run_stop;
            if (ids[j] >= hi) continue; /* all gap */
            offs[P] = base + lo * row_bytes, nbytes[P] = (hi - lo) * row_bytes, first[P] = V, P++;
            int64_t prev = lo - 1, prev_row = -2;
            int head = 1;
            for (; j <= e && ids[j] < hi; j++) {
                int64_t gap = ids[j] - prev - 1;
                if (gap > 0) dest[V] = -1, lens[V] = gap * row_bytes, V++;
                if (head || gap > 0 || rows[j] != prev_row + 1)
                    dest[V] = rows[j] * row_bytes, lens[V] = row_bytes, V++;
                else
                    lens[V - 1] += row_bytes;
                prev = ids[j], prev_row = rows[j], head = 0;
            }
            if (hi - prev - 1 > 0) dest[V] = -1, lens[V] = (hi - prev - 1) * row_bytes, V++;
        }
    }
    first[P] = V;
    return P;
}

/* ---- flash reads (flashio.storage): one reader thread's share of a step's pieces in one call ----
 * piece i reads off[i] with the iovecs iov[first[i] .. first[i + 1]) (each piece fits IOV_MAX; a
 * short read is retried from where it stopped). Called through ctypes, which releases the GIL for
 * the whole share: the step's reads no longer take the interpreter lock once per read, which on a
 * 2-core machine stalled the compute thread they overlap with. Returns the bytes read; on an error
 * -errno, or -1000000 - i when piece i hit the end of the file. */
int64_t flashio_read_pieces(int fd, int64_t n, const int64_t *off, const int64_t *first, struct iovec *iov) {
    int64_t total = 0;
    for (int64_t i = 0; i < n; i++) {
        struct iovec *v = iov + first[i];
        int cnt = (int)(first[i + 1] - first[i]);
        int64_t pos = off[i];
        while (cnt > 0) {
            ssize_t got = preadv(fd, v, cnt, pos);
            if (got < 0) {
                if (errno == EINTR) continue;
                return -(int64_t)errno;
            }
            if (got == 0) return -1000000 - i;
            total += got;
            pos += got;
            while (cnt > 0 && (size_t)got >= v->iov_len) { /* whole iovecs done */
                got -= (ssize_t)v->iov_len;
                v++, cnt--;
            }
            if (cnt > 0 && got > 0) { /* partway into one: the rest of it next (the caller's table is scratch) */
                v->iov_base = (char *)v->iov_base + got;
                v->iov_len -= (size_t)got;
            }
        }
    }
    return total;
}

/* The same for reads that are not block-aligned (O_DIRECT): piece i reads span[i] bytes from lo[i]
 * (its block-aligned superset) into `stage`, then copies its segments seg[j] = (position in the
 * superset, destination address, bytes), j in first[i] .. first[i + 1], out of it. The superset
 * may pass the end of the file; the piece itself (need[i] bytes from lo[i]) may not. */
int64_t flashio_read_staged(int fd, int64_t n, const int64_t *lo, const int64_t *span, const int64_t *need,
                            const int64_t *first, const int64_t *seg, uint8_t *stage) {
    int64_t total = 0;
    for (int64_t i = 0; i < n; i++) {
        int64_t done = 0;
        while (done < span[i]) {
            ssize_t got = pread(fd, stage + done, (size_t)(span[i] - done), lo[i] + done);
            if (got < 0) {
                if (errno == EINTR) continue;
                return -(int64_t)errno;
            }
            if (got == 0) break; /* the end of the file */
            done += got;
        }
        if (done < need[i]) return -1000000 - i;
        total += done;
        for (int64_t j = first[i]; j < first[i + 1]; j++)
            memcpy((void *)(uintptr_t)seg[3 * j + 1], stage + seg[3 * j], (size_t)seg[3 * j + 2]);
    }
    return total;
}

/* The same reads through one io_uring (Linux 5.1+): up to `depth` pieces in flight from this one
 * thread, submitted and reaped in batches, instead of a pool of threads each blocked in preadv.
 * A virtio disk needs 16-32 small reads in flight; with threads every read also costs a thread's
 * wake-up and two context switches, CPU that the token's compute shares two cores with
 * (DESIGN.md: the PyPI liburing, same throughput, ~3x less CPU). Raw system calls, no liburing.
 * A ring belongs to one thread at a time (flashio.storage keeps one per reader thread). */
#if defined(__linux__) && defined(__has_include)
#if __has_include(<linux/io_uring.h>)
#define FLASHIO_URING 1
#endif
#endif

#ifdef FLASHIO_URING
#include <linux/io_uring.h>
#include <sys/mman.h>
#include <sys/syscall.h>

typedef struct {
    int fd;
    unsigned entries;
    unsigned *sq_tail, *sq_mask, *sq_array, *cq_head, *cq_tail, *cq_mask;
    struct io_uring_sqe *sqes;
    struct io_uring_cqe *cqes;
    void *sq_ptr, *cq_ptr;
    size_t sq_bytes, cq_bytes, sqe_bytes;
    int has_read;       /* IORING_OP_READ (Linux 5.6+): one buffer without an iovec */
    int64_t nbufs;      /* registered buffers (flashio_uring_buffers), sorted by address */
    struct fixed_buf { const char *base; size_t len; int64_t index; } *bufs;
} flashio_ring;

void flashio_uring_close(flashio_ring *r) {
    if (!r) return;
    free(r->bufs);
    if (r->sqes && r->sqes != MAP_FAILED) munmap(r->sqes, r->sqe_bytes);
    if (r->cq_ptr && r->cq_ptr != MAP_FAILED && r->cq_ptr != r->sq_ptr) munmap(r->cq_ptr, r->cq_bytes);
    if (r->sq_ptr && r->sq_ptr != MAP_FAILED) munmap(r->sq_ptr, r->sq_bytes);
    if (r->fd >= 0) close(r->fd);
    free(r);
}

static flashio_ring *uring_open(unsigned entries, unsigned flags);

/* A ring of `entries` submission slots, or NULL with *err = errno (no io_uring: seccomp, an old
 * kernel, io_uring_disabled). */
flashio_ring *flashio_uring_open(unsigned entries, int *err) {
    flashio_ring *r = uring_open(entries, 0);
    *err = r ? 0 : errno;
    return r;
}

static flashio_ring *uring_open(unsigned entries, unsigned flags) {
    struct io_uring_params p;
    memset(&p, 0, sizeof p);
    p.flags = flags;
    int fd = (int)syscall(__NR_io_uring_setup, entries, &p);
    if (fd < 0) return NULL;
    flashio_ring *r = calloc(1, sizeof *r);
    if (!r) {
        close(fd);
        errno = ENOMEM;
        return NULL;
    }
    r->fd = fd;
    r->entries = p.sq_entries;
    r->sq_bytes = p.sq_off.array + p.sq_entries * sizeof(unsigned);
    r->cq_bytes = p.cq_off.cqes + p.cq_entries * sizeof(struct io_uring_cqe);
    int single = (p.features & IORING_FEAT_SINGLE_MMAP) != 0;
    if (single) r->sq_bytes = r->cq_bytes = r->sq_bytes > r->cq_bytes ? r->sq_bytes : r->cq_bytes;
    r->sq_ptr = mmap(NULL, r->sq_bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, IORING_OFF_SQ_RING);
    if (r->sq_ptr == MAP_FAILED) goto fail;
    r->cq_ptr = single ? r->sq_ptr
                       : mmap(NULL, r->cq_bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, IORING_OFF_CQ_RING);
    if (r->cq_ptr == MAP_FAILED) goto fail;
    r->sqe_bytes = p.sq_entries * sizeof(struct io_uring_sqe);
    r->sqes = mmap(NULL, r->sqe_bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, IORING_OFF_SQES);
    if (r->sqes == MAP_FAILED) goto fail;
    char *sq = r->sq_ptr, *cq = r->cq_ptr;
    r->sq_tail = (unsigned *)(sq + p.sq_off.tail);
    r->sq_mask = (unsigned *)(sq + p.sq_off.ring_mask);
    r->sq_array = (unsigned *)(sq + p.sq_off.array);
    r->cq_head = (unsigned *)(cq + p.cq_off.head);
    r->cq_tail = (unsigned *)(cq + p.cq_off.tail);
    r->cq_mask = (unsigned *)(cq + p.cq_off.ring_mask);
    r->cqes = (struct io_uring_cqe *)(cq + p.cq_off.cqes);
    /* which operations the kernel has (IORING_REGISTER_PROBE is 5.6+, as IORING_OP_READ) */
    size_t probe_bytes = sizeof(struct io_uring_probe) + 256 * sizeof(struct io_uring_probe_op);
    struct io_uring_probe *probe = calloc(1, probe_bytes);
    if (probe && syscall(__NR_io_uring_register, fd, IORING_REGISTER_PROBE, probe, 256) >= 0)
        r->has_read = probe->last_op >= IORING_OP_READ && (probe->ops[IORING_OP_READ].flags & IO_URING_OP_SUPPORTED);
    free(probe);
    return r;
fail: {
    int e = errno;
    flashio_uring_close(r);
    errno = e;
    return NULL;
}
}

static int by_base(const void *a, const void *b) {
    uintptr_t x = (uintptr_t)((const struct fixed_buf *)a)->base, y = (uintptr_t)((const struct fixed_buf *)b)->base;
    return x < y ? -1 : x > y;
}

/* Register `n` buffers (e.g. the window caches' rows) with ring `r`, replacing those it had (n = 0:
 * none). A read that lands in one piece inside a registered buffer then goes as READ_FIXED: the
 * kernel pinned its pages once here instead of for every read (24 KiB O_DIRECT reads on a 2-vCPU
 * VM: 2.6 against 4.3 us of CPU each with READV). Registration pins and faults in every page, and
 * counts against RLIMIT_MEMLOCK without CAP_IPC_LOCK. Returns 0, or -errno with no buffer
 * registered (reads then go as before). Call only while no read of `r` is in flight, and again
 * with n = 0 before a registered buffer is unmapped (its pages stay pinned while registered). */
int64_t flashio_uring_buffers(flashio_ring *r, int64_t n, const struct iovec *bufs) {
    if (r->nbufs) {
        syscall(__NR_io_uring_register, r->fd, IORING_UNREGISTER_BUFFERS, NULL, 0);
        free(r->bufs);
        r->bufs = NULL;
        r->nbufs = 0;
    }
    if (n <= 0) return 0;
    if (n > 16384) return -EINVAL; /* the kernel's limit (UIO_MAXIOV before 6.x: 1024; it says so) */
    struct fixed_buf *table = malloc((size_t)n * sizeof *table);
    if (!table) return -ENOMEM;
    if (syscall(__NR_io_uring_register, r->fd, IORING_REGISTER_BUFFERS, bufs, (unsigned)n) < 0) {
        int e = errno;
        free(table);
        return -(int64_t)e;
    }
    /* the kernel's indices are the order given; the table is searched by address */
    for (int64_t i = 0; i < n; i++) table[i] = (struct fixed_buf){bufs[i].iov_base, bufs[i].iov_len, i};
    qsort(table, (size_t)n, sizeof *table, by_base);
    r->bufs = table;
    r->nbufs = n;
    return 0;
}

/* The index of the registered buffer that holds [p, p + len), or -1. */
static int64_t fixed_index(const flashio_ring *r, const char *p, size_t len) {
    int64_t lo = 0, hi = r->nbufs - 1, k = -1;
    while (lo <= hi) { /* the last buffer starting at or below p */
        int64_t mid = (lo + hi) / 2;
        if (r->bufs[mid].base <= p) k = mid, lo = mid + 1;
        else hi = mid - 1;
    }
    if (k < 0 || (size_t)(p - r->bufs[k].base) + len > r->bufs[k].len) return -1;
    return r->bufs[k].index;
}

/* flashio_read_pieces through ring `r`, at most `depth` pieces in flight (<= the ring's entries).
 * Same arguments and result: the bytes read, -errno, or -1000000 - i when the file ends inside
 * piece i. A piece that completes short (not at the end of the file: not seen with O_DIRECT) is
 * finished with preadv. On an error the reads still in flight are waited for before returning:
 * none writes into the caller's memory afterwards. */
int64_t flashio_uring_read_pieces(flashio_ring *r, int fd, int64_t n, const int64_t *off, const int64_t *first,
                                  struct iovec *iov, int64_t depth) {
    if (depth > (int64_t)r->entries) depth = r->entries;
    if (depth < 1) depth = 1;
    int64_t next = 0, inflight = 0, total = 0, err = 0;
    unsigned pending = 0; /* queued in the ring, not yet taken by the kernel */
    int failures = 0;     /* io_uring_enter errors in a row */
    while (next < n || inflight > 0) {
        unsigned tail = *r->sq_tail, mask = *r->sq_mask;
        while (next < n && inflight < depth && !err) {
            unsigned idx = tail & mask;
            struct io_uring_sqe *sqe = &r->sqes[idx];
            memset(sqe, 0, sizeof *sqe);
            sqe->fd = fd;
            sqe->off = (uint64_t)off[next];
            sqe->user_data = (uint64_t)next;
            if (r->has_read && first[next + 1] - first[next] == 1) { /* one buffer: no iovec to import */
                const struct iovec *v = iov + first[next];
                int64_t k = r->nbufs ? fixed_index(r, v->iov_base, v->iov_len) : -1;
                sqe->opcode = k >= 0 ? IORING_OP_READ_FIXED : IORING_OP_READ;
                sqe->buf_index = k >= 0 ? (uint16_t)k : 0;
                sqe->addr = (uint64_t)(uintptr_t)v->iov_base;
                sqe->len = (uint32_t)v->iov_len;
            } else {
                sqe->opcode = IORING_OP_READV;
                sqe->addr = (uint64_t)(uintptr_t)(iov + first[next]);
                sqe->len = (uint32_t)(first[next + 1] - first[next]);
            }
            r->sq_array[idx] = idx;
            tail++, next++, inflight++, pending++;
        }
        __atomic_store_n(r->sq_tail, tail, __ATOMIC_RELEASE);
        if (inflight == 0) break; /* an error stopped the submissions and everything is back */
        /* wake up for a quarter of the ring's reads while more wait to be submitted (the ring stays
         * >= 3/4 full), for all of them once none does, rather than for each: fewer wake-ups of this
         * thread on cores the compute threads share (9600 scattered 24 KiB reads on a 2-vCPU VM,
         * five alternated pairs: 0.87 against 0.76 GB/s, ~8 us of CPU per read either way) */
        int64_t batch = depth / 4 > 1 ? depth / 4 : 1;
        unsigned want = (unsigned)(next < n && !err ? (inflight < batch ? inflight : batch) : inflight);
        int got = (int)syscall(__NR_io_uring_enter, r->fd, pending, want, IORING_ENTER_GETEVENTS, NULL, 0);
        if (got < 0) {
            if (errno == EINTR || errno == EAGAIN || errno == EBUSY) continue;
            /* the ring itself failed: stop submitting, take back what the kernel did not take and
             * keep waiting for what it did (it writes into the caller's memory) */
            if (!err) err = -(int64_t)errno;
            if (pending) {
                __atomic_store_n(r->sq_tail, tail - pending, __ATOMIC_RELEASE);
                inflight -= pending;
                pending = 0;
            }
            if (inflight == 0 || ++failures > 1000) break;
            continue;
        }
        failures = 0;
        pending -= (unsigned)got;
        unsigned head = *r->cq_head, ctail = __atomic_load_n(r->cq_tail, __ATOMIC_ACQUIRE);
        for (; head != ctail; head++) {
            struct io_uring_cqe *cqe = &r->cqes[head & *r->cq_mask];
            int64_t i = (int64_t)cqe->user_data, res = cqe->res;
            inflight--;
            if (err) continue;
            if (res < 0) {
                err = res;
                continue;
            }
            int64_t want = 0;
            for (int64_t j = first[i]; j < first[i + 1]; j++) want += (int64_t)iov[j].iov_len;
            if (res == 0 && want > 0) {
                err = -1000000 - i;
                continue;
            }
            if (res < want) { /* the rest synchronously (the iovec table is scratch) */
                int64_t part[2] = {off[i] + res, 0}, range[2] = {0, first[i + 1] - first[i]};
                struct iovec *v = iov + first[i];
                int cnt = (int)range[1];
                int64_t skip = res;
                while (cnt > 0 && skip >= (int64_t)v->iov_len) skip -= (int64_t)v->iov_len, v++, cnt--;
                v->iov_base = (char *)v->iov_base + skip;
                v->iov_len -= (size_t)skip;
                range[1] = cnt;
                int64_t rest = flashio_read_pieces(fd, 1, part, range, v);
                if (rest < 0) {
                    err = rest <= -1000000 ? -1000000 - i : rest;
                    continue;
                }
                res += rest;
            }
            total += res;
        }
        __atomic_store_n(r->cq_head, head, __ATOMIC_RELEASE);
    }
    return err ? err : total;
}

/* A reading thread of its own (flashio.storage's submit_rows): a layer's reads of scattered rows
 * validated, planned (flashio_scatter_tables) and queued in one call from the caller, then read
 * through the thread's ring by flashio_uring_read_pieces, jobs in the order they came, while the
 * caller goes on. No Python runs on the thread, and little on the caller: on the pool, with the
 * tables built in numpy, the hand-over took ~250-300 us of the compute thread per layer (Llama-2-7B
 * shape: a token's small Python steps run 3-10x slower than alone, after products that stream
 * the caches). A job owns its tables; flashio_job_free releases it once waited for. */
typedef struct flashio_job {
    int fd;
    int64_t n, depth;          /* pieces, reads in flight */
    int64_t *off, *nbytes, *first;
    struct iovec *iov;         /* NULL: a registration (n buffers at `bufs`) */
    const struct iovec *bufs;
    int64_t result;
    long t_end_ns;             /* CLOCK_MONOTONIC when its last read completed */
    _Atomic int done;
    struct flashio_job *next;
} flashio_job;

typedef struct {
    flashio_ring *ring;
    unsigned entries;
    int open_err;              /* the thread's ring: 0, or the errno that refused it */
    _Atomic int opened;
    pthread_t tid;
    pthread_mutex_t mu;
    pthread_cond_t work, finished;
    flashio_job *head, *tail;
    int stop;
} flashio_reads;

#ifndef IORING_SETUP_SINGLE_ISSUER
#define IORING_SETUP_SINGLE_ISSUER (1U << 12)
#endif
#ifndef IORING_SETUP_DEFER_TASKRUN
#define IORING_SETUP_DEFER_TASKRUN (1U << 13)
#endif

/* The thread opens its ring itself: with SINGLE_ISSUER and DEFER_TASKRUN (Linux 6.1+) the kernel
 * runs the reads' completion work when the thread asks for completions, not by waking it for
 * each batch that lands (a 285-read layer: 3 against 10 context switches, each taking a core
 * from the compute it overlaps); such a ring takes submissions and registrations from this thread
 * only. Older kernels refuse the flags: a plain ring. */
static void *reads_main(void *arg) {
    flashio_reads *q = arg;
#ifdef _GNU_SOURCE
    pthread_setname_np(pthread_self(), "flashio-reads");
#endif
    flashio_ring *ring = uring_open(q->entries, IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN);
    if (!ring && errno == EINVAL) ring = uring_open(q->entries, 0);
    pthread_mutex_lock(&q->mu);
    q->ring = ring;
    q->open_err = ring ? 0 : errno;
    atomic_store(&q->opened, 1);
    pthread_cond_broadcast(&q->finished);
    if (!ring) {
        pthread_mutex_unlock(&q->mu);
        return NULL;
    }
    for (;;) {
        while (!q->head && !q->stop) pthread_cond_wait(&q->work, &q->mu);
        flashio_job *j = q->head;
        if (!j) break; /* stopped, nothing left */
        q->head = j->next;
        if (!q->head) q->tail = NULL;
        pthread_mutex_unlock(&q->mu);
        int64_t got = j->iov ? flashio_uring_read_pieces(q->ring, j->fd, j->n, j->off, j->first, j->iov, j->depth)
                             : flashio_uring_buffers(q->ring, j->n, j->bufs);
        pthread_mutex_lock(&q->mu);
        j->result = got;
        j->t_end_ns = now_ns();
        atomic_store_explicit(&j->done, 1, memory_order_release);
        pthread_cond_broadcast(&q->finished);
    }
    pthread_mutex_unlock(&q->mu);
    flashio_uring_close(ring);
    return NULL;
}

/* A reading thread with a ring of `entries` slots, or NULL with *err = errno. */
flashio_reads *flashio_reads_open(unsigned entries, int *err) {
    flashio_reads *q = calloc(1, sizeof *q);
    if (!q) {
        *err = ENOMEM;
        return NULL;
    }
    q->entries = entries;
    pthread_mutex_init(&q->mu, NULL);
    pthread_cond_init(&q->work, NULL);
    pthread_cond_init(&q->finished, NULL);
    int e = pthread_create(&q->tid, NULL, reads_main, q);
    if (!e) {
        pthread_mutex_lock(&q->mu);
        while (!atomic_load(&q->opened)) pthread_cond_wait(&q->finished, &q->mu);
        pthread_mutex_unlock(&q->mu);
        if (!q->ring) {
            e = q->open_err ? q->open_err : EIO;
            pthread_join(q->tid, NULL);
        }
    }
    if (e) {
        pthread_mutex_destroy(&q->mu);
        pthread_cond_destroy(&q->work);
        pthread_cond_destroy(&q->finished);
        free(q);
        *err = e;
        return NULL;
    }
    *err = 0;
    return q;
}

static void reads_queue(flashio_reads *q, flashio_job *j) {
    pthread_mutex_lock(&q->mu);
    if (q->tail) q->tail->next = j;
    else q->head = j;
    q->tail = j;
    pthread_cond_signal(&q->work);
    pthread_mutex_unlock(&q->mu);
}

int64_t flashio_job_wait(flashio_reads *q, flashio_job *j, double *t_end);

/* flashio_uring_buffers on the thread's ring, done by the thread (in turn with its jobs: call it
 * while none is queued or running); its result. */
int64_t flashio_reads_buffers(flashio_reads *q, int64_t n, const struct iovec *bufs) {
    flashio_job *j = calloc(1, sizeof *j);
    if (!j) return -ENOMEM;
    j->n = n, j->bufs = bufs;
    reads_queue(q, j);
    double t;
    int64_t got = flashio_job_wait(q, j, &t);
    free(j);
    return got;
}

/* Queue the reads of a layer's rows ids[0..n) (sorted unique, in [0, n_rows)) into out's rows
 * rows[0..n) (distinct, in [0, n_out)): the layer's rows are row_bytes each from file offset
 * `base`; runs across gaps of up to max_gap rows, pieces of at most max_rows rows; gaps land in
 * `scratch` (max_rows rows at least; NULL when max_gap is 0). Returns the job, or NULL with *err
 * = 1 (ids not sorted unique or out of range), 2 (rows not distinct or out of range) or ENOMEM;
 * nothing is queued then. */
flashio_job *flashio_reads_rows(flashio_reads *q, int fd, const int64_t *ids, const int64_t *rows, int64_t n,
                                int64_t n_rows, int64_t n_out, int64_t row_bytes, int64_t base, int64_t max_gap,
                                int64_t max_rows, char *out, char *scratch, int64_t depth, int *err) {
    *err = 0;
    for (int64_t j = 0; j < n; j++)
        if (ids[j] < 0 || ids[j] >= n_rows || (j && ids[j] <= ids[j - 1])) {
            *err = 1;
            return NULL;
        }
    unsigned char *seen = calloc((size_t)(n_out > 0 ? n_out : 1), 1);
    if (!seen) {
        *err = ENOMEM;
        return NULL;
    }
    for (int64_t j = 0; j < n; j++) {
        if (rows[j] < 0 || rows[j] >= n_out || seen[rows[j]]) {
            free(seen);
            *err = 2;
            return NULL;
        }
        seen[rows[j]] = 1;
    }
    free(seen);
    if (max_gap > 0 && !scratch) {
        *err = EINVAL;
        return NULL;
    }
    /* one block: the job, then offs, nbytes, first, dest, lens (int64) and the iovecs */
    size_t ints = (size_t)n * 2 + (size_t)n + 1 + (size_t)n * 6;
    flashio_job *j = calloc(1, sizeof *j + ints * sizeof(int64_t) + (size_t)n * 3 * sizeof(struct iovec));
    if (!j) {
        *err = ENOMEM;
        return NULL;
    }
    int64_t *t = (int64_t *)(j + 1);
    int64_t *offs = t, *nbytes = offs + n, *first = nbytes + n, *dest = first + n + 1, *lens = dest + 3 * n;
    struct iovec *iov = (struct iovec *)(lens + 3 * n);
    int64_t P = flashio_scatter_tables(ids, rows, n, row_bytes, base, max_gap, max_rows, offs, nbytes, first, dest, lens);
    for (int64_t e = 0; e < first[P]; e++) {
        iov[e].iov_base = dest[e] >= 0 ? out + dest[e] : scratch;
        iov[e].iov_len = (size_t)lens[e];
    }
    j->fd = fd, j->n = P, j->depth = depth, j->off = offs, j->nbytes = nbytes, j->first = first, j->iov = iov;
    reads_queue(q, j);
    return j;
}

/* A job's pieces; their sizes copied to `nbytes` when not NULL, and where piece i starts to *off. */
int64_t flashio_job_pieces(flashio_job *j, int64_t *nbytes, int64_t i, int64_t *off) {
    if (nbytes) memcpy(nbytes, j->nbytes, (size_t)j->n * sizeof *nbytes);
    if (off && i >= 0 && i < j->n) *off = j->off[i];
    return j->n;
}

int flashio_job_done(flashio_job *j) { return atomic_load_explicit(&j->done, memory_order_acquire); }

/* Wait for job `j`: flashio_uring_read_pieces' result; *t_end = when it completed (seconds of
 * CLOCK_MONOTONIC, which is Python's time.perf_counter on Linux). */
int64_t flashio_job_wait(flashio_reads *q, flashio_job *j, double *t_end) {
    if (!atomic_load_explicit(&j->done, memory_order_acquire)) {
        pthread_mutex_lock(&q->mu);
        while (!atomic_load_explicit(&j->done, memory_order_acquire)) pthread_cond_wait(&q->finished, &q->mu);
        pthread_mutex_unlock(&q->mu);
    }
    *t_end = (double)j->t_end_ns * 1e-9;
    return j->result;
}

/* The file descriptors of a ring and of a reading thread's ring (/proc/self/fdinfo says what is
 * registered: tests, diagnostics). */
int flashio_uring_fd(flashio_ring *r) { return r->fd; }
int flashio_reads_fd(flashio_reads *q) { return q->ring->fd; }

/* Release a job that was waited for. */
void flashio_job_free(flashio_job *j) { free(j); }

/* Finish the queued jobs, stop the thread, close its ring. */
void flashio_reads_close(flashio_reads *q) {
    if (!q) return;
    pthread_mutex_lock(&q->mu);
    q->stop = 1;
    pthread_cond_signal(&q->work);
    pthread_mutex_unlock(&q->mu);
    pthread_join(q->tid, NULL); /* the thread closes its ring */
    pthread_mutex_destroy(&q->mu);
    pthread_cond_destroy(&q->work);
    pthread_cond_destroy(&q->finished);
    free(q);
}
#else
void *flashio_uring_open(unsigned entries, int *err) {
    (void)entries;
    *err = ENOSYS;
    return NULL;
}
void flashio_uring_close(void *r) { (void)r; }
int64_t flashio_uring_buffers(void *r, int64_t n, const struct iovec *bufs) {
    (void)r, (void)n, (void)bufs;
    return -ENOSYS;
}
int64_t flashio_uring_read_pieces(void *r, int fd, int64_t n, const int64_t *off, const int64_t *first,
                                  struct iovec *iov, int64_t depth) {
    (void)r, (void)fd, (void)n, (void)off, (void)first, (void)iov, (void)depth;
    return -ENOSYS;
}
void *flashio_reads_open(unsigned entries, int *err) {
    (void)entries;
    *err = ENOSYS;
    return NULL;
}
int64_t flashio_reads_buffers(void *q, int64_t n, const struct iovec *bufs) {
    (void)q, (void)n, (void)bufs;
    return -ENOSYS;
}
void *flashio_reads_rows(void *q, int fd, const int64_t *ids, const int64_t *rows, int64_t n, int64_t n_rows,
                         int64_t n_out, int64_t row_bytes, int64_t base, int64_t max_gap, int64_t max_rows, char *out,
                         char *scratch, int64_t depth, int *err) {
    (void)q, (void)fd, (void)ids, (void)rows, (void)n, (void)n_rows, (void)n_out, (void)row_bytes, (void)base;
    (void)max_gap, (void)max_rows, (void)out, (void)scratch, (void)depth;
    *err = ENOSYS;
    return NULL;
}
int64_t flashio_job_pieces(void *j, int64_t *nbytes, int64_t i, int64_t *off) {
    (void)j, (void)nbytes, (void)i, (void)off;
    return 0;
}
int flashio_job_done(void *j) { (void)j; return 1; }
int flashio_uring_fd(void *r) { (void)r; return -1; }
int flashio_reads_fd(void *q) { (void)q; return -1; }
int64_t flashio_job_wait(void *q, void *j, double *t_end) {
    (void)q, (void)j;
    *t_end = 0;
    return -ENOSYS;
}
void flashio_job_free(void *j) { (void)j; }
void flashio_reads_close(void *q) { (void)q; }
#endif
