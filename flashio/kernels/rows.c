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
 * Three builds of one source: AVX-512 (F + F16C), AVX2 (+ F16C + FMA), and portable C; the
 * compiler's target flags choose (flashio.kernels compiles with -march=native).
 */
#include <stdint.h>
#include <string.h>

#if defined(__AVX512F__) && defined(__F16C__)
#define FLASHIO_AVX512 1
#include <immintrin.h>
#elif defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
#define FLASHIO_AVX2 1
#include <immintrin.h>
#endif

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

static inline float bf16_to_float(uint16_t b) {
    uint32_t bits = (uint32_t)b << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline float load1(const void *p, int64_t i, int dtype) {
    if (dtype == 0) return ((const float *)p)[i];
    if (dtype == 1) return half_to_float(((const uint16_t *)p)[i]);
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

static float dot1(const void *row, const float *x, int64_t len, int dtype) {
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
static void dot4(const void *r0, const void *r1, const void *r2, const void *r3, const float *x, int64_t len,
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

void flashio_dot(const void *rows, int64_t stride, int64_t n_rows, int64_t len, int dtype,
                 const float *x, float *out) {
    int64_t n = 0;
    for (; n + 4 <= n_rows; n += 4)
        dot4(row_at(rows, n, stride, dtype), row_at(rows, n + 1, stride, dtype), row_at(rows, n + 2, stride, dtype),
             row_at(rows, n + 3, stride, dtype), x, len, dtype, out + n);
    for (; n < n_rows; n++) out[n] = dot1(row_at(rows, n, stride, dtype), x, len, dtype);
}

/* y[k] += a0 * r0[k] + a1 * r1[k] + a2 * r2[k] + a3 * r3[k]: four rows per pass over y */
static void axpy4(float *y, const void *r0, const void *r1, const void *r2, const void *r3,
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

static void axpy1(float *y, const void *r, float a, int64_t len, int dtype) {
    int64_t k = 0;
#if defined(VW)
    vec b = vset1(a);
    for (; k + VW <= len; k += VW) vstoref(y + k, vfmadd(vload(r, k, dtype), b, vloadf(y + k)));
#endif
    for (; k < len; k++) y[k] += a * load1(r, k, dtype);
}

void flashio_axpy(const void *rows, int64_t stride, int64_t n_rows, int64_t len, int dtype,
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
