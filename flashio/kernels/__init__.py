"""Native kernels for the one-token FFN products on bundle rows (rows.c beside this file).

On the CPU, torch's float16 and bfloat16 matrix-vector products run near the memory's speed only
for a contiguous matrix multiplied from the right (`F.linear(x, W)`, W [out, in]). A bundle row
holds a neuron's up column and down row side by side, so a layer's up part is a strided matrix
and its down product multiplies from the left: measured on a 2-vCPU AMD EPYC (torch 2.13, one
thread, 5504 rows of a Llama layer at half scale), up 4.9 GB/s and down 0.3-3.9 GB/s in float16,
8 and 5 GB/s in bfloat16, against 17 GB/s for a contiguous `F.linear`. rows.c computes both
products on the strided rows, widening each element to float32 as it is loaded and accumulating
in float32; the down product skips rows whose coefficient is zero (neurons that did not fire).
A gated FFN's gate and up products share one pass over the rows. Quantized rows' dot products
take x rounded to int8 in blocks of 32 on CPUs with AVX-512 VNNI and multiply in integers (see
`int8_activations`), as llama.cpp does with its Q8 activations; their loops prefetch the next
four rows (a quantized part, 2-4 KiB, is too short for the hardware's stream prefetcher).

The source is compiled once per machine with the system's C compiler (`$CC`, else `cc`;
`-O3 -march=native`) into a cache directory (`$FLASHIO_KERNEL_CACHE`, default
`~/.cache/flashio/kernels`), keyed by the source, the flags, the compiler and the CPU's flags, and
loaded with ctypes (which releases the GIL for the call: flash reader threads run meanwhile). No
compiler, or `FLASHIO_KERNELS=0`: `available()` is False and flashio.ffn uses torch's products
(the same results up to float rounding).

Each call can be split over several threads (`set_threads`; flashio.open sets every CPU, at most 8,
unless FlashConfig.compute_threads says otherwise): one core does not reach the memory's speed
(this project's 2-core machines: a float16 matrix-vector product 31-35 GB/s on one thread, 44-47
on two; a dense Llama-2-7B token 540-650 ms on one, 290-360 on two). The workers are rows.c's own threads, not torch's: they
take chunks of a call's rows as they come, so a worker whose core is busy elsewhere delays
nothing (torch's OpenMP threads wait for one another, which made steps 10-50x slower on a shared
2-core machine; torch stays at one thread for the per-token work).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("rows.c")
FLAGS = ("-O3", "-march=native", "-fPIC", "-shared", "-std=c11")
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
ACTIVATION_CODES = {"relu": 0, "silu": 1, "gelu_pytorch_tanh": 2}
MAX_DEFAULT_THREADS = 8

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False
_why: str | None = None


def cache_dir() -> Path:
    return Path(os.environ.get("FLASHIO_KERNEL_CACHE") or Path.home() / ".cache" / "flashio" / "kernels")


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def build(flags: tuple[str, ...] = FLAGS, *, out_dir: Path | None = None) -> Path:
    """Compile rows.c with `flags` (cached: an existing build of the same key is returned).
    Raises RuntimeError with the compiler's message when it cannot be built."""
    cc = os.environ.get("CC") or "cc"
    cmd = shlex.split(cc)  # e.g. CC="ccache gcc"
    exe = shutil.which(cmd[0]) if cmd else None
    if exe is None:
        raise RuntimeError(f"no C compiler ({cc!r} is not on PATH)")
    cmd[0] = exe
    try:
        version = subprocess.run([*cmd, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise RuntimeError(f"{cc} --version failed: {exc}") from None
    src = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([src, " ".join(flags).encode(), version.encode(), _cpu_flags().encode(),
                                     platform.machine().encode()])).hexdigest()[:16]
    out_dir = out_dir or cache_dir()
    target = out_dir / f"rows-{key}.so"
    if target.exists():
        return target
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=".rows-", suffix=".so")  # then renamed: concurrent builds are safe
    os.close(fd)
    try:
        try:
            r = subprocess.run([*cmd, *flags, "-o", tmp, str(SOURCE), "-lm", "-pthread"], capture_output=True, text=True,
                               timeout=300)
        except (OSError, subprocess.SubprocessError) as exc:  # e.g. TimeoutExpired
            raise RuntimeError(f"{cc} failed: {exc}") from None
        if r.returncode != 0:
            raise RuntimeError(f"{cc} failed ({r.returncode}): {(r.stderr or r.stdout).strip()[-2000:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    args = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int, ctypes.c_void_p,
            ctypes.c_void_p]
    for name in ("flashio_dot", "flashio_axpy"):
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, None
    qargs = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int, ctypes.c_int64,
             ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64]
    lib.flashio_qdot.argtypes, lib.flashio_qdot.restype = qargs + [ctypes.c_void_p] * 4, None
    lib.flashio_qaxpy.argtypes, lib.flashio_qaxpy.restype = qargs + [ctypes.c_void_p] * 3, None
    lib.flashio_ffn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int,
                                ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int] + [ctypes.c_void_p] * 7
    lib.flashio_ffn.restype = None
    lib.flashio_i8_matvec.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64] + [ctypes.c_void_p] * 3
    lib.flashio_i8_matvec.restype = None
    lib.flashio_attend1.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                                    ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                                    ctypes.c_int64, ctypes.c_int, ctypes.c_float, ctypes.c_void_p, ctypes.c_void_p]
    lib.flashio_attend1.restype = None
    lib.flashio_rms.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int, ctypes.c_void_p,
                                ctypes.c_float, ctypes.c_void_p]
    lib.flashio_rms.restype = None
    lib.flashio_rope.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int] + [ctypes.c_void_p] * 3
    lib.flashio_rope.restype = None
    lib.flashio_scatter_tables.argtypes = [ctypes.c_void_p, ctypes.c_void_p] + [ctypes.c_int64] * 5 + [ctypes.c_void_p] * 5
    lib.flashio_scatter_tables.restype = ctypes.c_int64
    lib.flashio_vector_bits.argtypes, lib.flashio_vector_bits.restype = [], ctypes.c_int
    lib.flashio_set_threads.argtypes, lib.flashio_set_threads.restype = [ctypes.c_int], ctypes.c_int
    lib.flashio_threads.argtypes, lib.flashio_threads.restype = [], ctypes.c_int
    lib.flashio_q8_path.argtypes, lib.flashio_q8_path.restype = [ctypes.c_int64, ctypes.c_int, ctypes.c_int64], ctypes.c_int
    lib.flashio_read_pieces.argtypes = [ctypes.c_int, ctypes.c_int64] + [ctypes.c_void_p] * 3
    lib.flashio_read_pieces.restype = ctypes.c_int64
    lib.flashio_read_staged.argtypes = [ctypes.c_int, ctypes.c_int64] + [ctypes.c_void_p] * 6
    lib.flashio_read_staged.restype = ctypes.c_int64
    lib.flashio_uring_open.argtypes = [ctypes.c_uint, ctypes.POINTER(ctypes.c_int)]
    lib.flashio_uring_open.restype = ctypes.c_void_p
    lib.flashio_uring_close.argtypes, lib.flashio_uring_close.restype = [ctypes.c_void_p], None
    lib.flashio_uring_read_pieces.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int64] + [ctypes.c_void_p] * 3 + [
        ctypes.c_int64]
    lib.flashio_uring_read_pieces.restype = ctypes.c_int64
    lib.flashio_uring_buffers.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p]
    lib.flashio_uring_buffers.restype = ctypes.c_int64
    lib.flashio_predict.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64,
                                    ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_float] + [ctypes.c_void_p] * 3
    lib.flashio_predict.restype = ctypes.c_int64
    lib.flashio_reads_open.argtypes = [ctypes.c_uint, ctypes.POINTER(ctypes.c_int)]
    lib.flashio_reads_open.restype = ctypes.c_void_p
    lib.flashio_uring_fd.argtypes, lib.flashio_uring_fd.restype = [ctypes.c_void_p], ctypes.c_int
    lib.flashio_reads_fd.argtypes, lib.flashio_reads_fd.restype = [ctypes.c_void_p], ctypes.c_int
    lib.flashio_reads_buffers.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p]
    lib.flashio_reads_buffers.restype = ctypes.c_int64
    lib.flashio_reads_rows.argtypes = [ctypes.c_void_p, ctypes.c_int] + [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 7 + [
        ctypes.c_void_p] * 2 + [ctypes.c_int64, ctypes.POINTER(ctypes.c_int)]
    lib.flashio_reads_rows.restype = ctypes.c_void_p
    lib.flashio_job_pieces.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.POINTER(ctypes.c_int64)]
    lib.flashio_job_pieces.restype = ctypes.c_int64
    lib.flashio_job_done.argtypes, lib.flashio_job_done.restype = [ctypes.c_void_p], ctypes.c_int
    lib.flashio_job_wait.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.POINTER(ctypes.c_double)]
    lib.flashio_job_wait.restype = ctypes.c_int64
    lib.flashio_job_free.argtypes, lib.flashio_job_free.restype = [ctypes.c_void_p], None
    lib.flashio_reads_close.argtypes, lib.flashio_reads_close.restype = [ctypes.c_void_p], None
    return lib


def library() -> ctypes.CDLL | None:
    """The compiled kernels, built on first use; None when they cannot be (see `why_not`)."""
    global _lib, _tried, _why
    if _tried:
        return _lib
    with _lock:
        if not _tried:
            if os.environ.get("FLASHIO_KERNELS", "1") == "0":
                _why = "FLASHIO_KERNELS=0"
            else:
                try:
                    _lib = load(build())
                except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
                    _why = str(exc)
                    log.warning("flashio: native FFN kernels unavailable, using torch's products (slower "
                                "for float16/bfloat16 on the CPU): %s", exc)
            _tried = True
    return _lib


def set_threads(n: int) -> int:
    """Split each kernel call over `n` threads: the caller and n - 1 workers of rows.c's pool
    (process-wide, as torch's thread count; a worker spins for up to 50 us after a call, then
    sleeps). Returns the count in effect: 1 without the kernels, fewer than asked when a worker
    could not be started."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"threads must be an integer >= 1, got {n!r}")
    lib = library()
    return 1 if lib is None else int(lib.flashio_set_threads(n))


def default_threads(cpus: int | None = None) -> int:
    """The kernels' threads when nothing says: every CPU this process may run on, at most
    MAX_DEFAULT_THREADS (a matrix-vector product stops gaining once the memory is saturated)."""
    if cpus is None:
        try:
            cpus = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):  # not Linux
            cpus = os.cpu_count() or 1
    return max(1, min(cpus, MAX_DEFAULT_THREADS))


def threads_for(n: int | None) -> int:
    """The threads FlashConfig.compute_threads=n gives the kernels: n, else default_threads(); 1
    without the kernels."""
    return 1 if not available() else n or default_threads()


def threads() -> int:
    """The threads each kernel call is split over (1 without the kernels)."""
    lib = library()
    return 1 if lib is None else int(lib.flashio_threads())


def available() -> bool:
    return library() is not None


def why_not() -> str | None:
    """Why the kernels are not used (None when they are)."""
    library()
    return _why


def supports(rows: torch.Tensor) -> bool:
    """Whether `rows` ([R, W] bundle rows) can go through the kernels."""
    return (rows.device.type == "cpu" and rows.dtype in DTYPE_CODES and rows.dim() == 2
            and (rows.shape[1] <= 1 or rows.stride(1) == 1) and available())


class Kernels:
    """The two products on one library (tests build several: AVX-512, AVX2, portable)."""

    def __init__(self, lib: ctypes.CDLL):
        self.lib = lib
        self.vector_bits = lib.flashio_vector_bits()
        self._parts: dict[int, tuple] = {}  # ffn: id(parts) -> (parts, row width, part offsets, their slices), checked

    def int8_activations(self, dim: int, bits: int, group: int) -> bool:
        """Whether qdot on a part of `dim` elements (`bits` 8 or 4, `group` elements per scale), and
        i8_matvec with `bits` 8 and group == dim, multiply int8 activations (rows.c's vnni_rows,
        AVX-512 VNNI builds; x as `int8_activations(x)` gives it back) rather than float ones."""
        return bool(self.lib.flashio_q8_path(dim, bits, group))

    def _args(self, rows: torch.Tensor, part: slice, n: int) -> tuple:
        if rows.device.type != "cpu" or rows.dtype not in DTYPE_CODES:
            raise ValueError(f"kernels take CPU float32/float16/bfloat16 rows, got {rows.dtype} on {rows.device}")
        if rows.dim() != 2 or (rows.shape[1] > 1 and rows.stride(1) != 1):
            raise ValueError("rows must be a 2-D tensor with contiguous rows")
        if n > rows.shape[0]:
            raise ValueError(f"{n} rows asked of {rows.shape[0]}")
        start, stop, step = part.indices(rows.shape[1])
        if step != 1 or stop <= start:
            raise ValueError(f"part {part} is not a non-empty contiguous slice")
        ptr = rows.data_ptr() + start * rows.element_size()
        return ptr, rows.stride(0), n, stop - start, DTYPE_CODES[rows.dtype]

    def dot(self, rows: torch.Tensor, part: slice, x: torch.Tensor, n: int | None = None) -> torch.Tensor:
        """[n] float32: rows[:n, part] @ x (x: [len] float32)."""
        n = rows.shape[0] if n is None else n
        ptr, stride, n, length, code = self._args(rows, part, n)
        x = _f32_vector(x, length)
        out = torch.empty(n, dtype=torch.float32)
        self.lib.flashio_dot(ptr, stride, n, length, code, x.data_ptr(), out.data_ptr())
        return out

    def axpy(self, rows: torch.Tensor, part: slice, a: torch.Tensor, n: int | None = None) -> torch.Tensor:
        """[len] float32: a @ rows[:n, part] (a: [n] float32); rows with a == 0 are not read."""
        n = rows.shape[0] if n is None else n
        ptr, stride, n, length, code = self._args(rows, part, n)
        a = _f32_vector(a, n)
        y = torch.empty(length, dtype=torch.float32)
        self.lib.flashio_axpy(ptr, stride, n, length, code, a.data_ptr(), y.data_ptr())
        return y


    def ffn(self, rows: torch.Tensor, parts: dict[str, slice], x: torch.Tensor, activation: str, n: int | None = None, *,
            b_up: torch.Tensor | None = None, b_gate: torch.Tensor | None = None, gate_act: torch.Tensor | None = None,
            mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The one-token FFN over rows[:n] in one pass per row (rows.c's flashio_ffn): returns y [len]
        and the activations a [n] (float32). activation: relu, silu or gelu_pytorch_tanh (of the gate
        when `parts` has one, else of up); gate_act: act(gate) computed elsewhere, [n]; mask [n]: rows
        at 0 are not read. Vectors are [n] float32 or None."""
        n = rows.shape[0] if n is None else n
        _, stride, n, length, code = self._args(rows, parts["up"], n)
        width = rows.shape[1]
        # the engines pass one dict for every call: its parts are checked once per width and content
        key = tuple((name, p.start, p.stop, p.step) for name, p in parts.items())
        known = self._parts.get(id(parts))
        if known is not None and known[0] is parts and known[1] == width and known[3] == key:
            offset = known[2]
        else:
            offset = {name: part.indices(width)[0] for name, part in parts.items()}
            for name, part in parts.items():
                a0, b0, st = part.indices(width)
                if st != 1 or b0 - a0 != length:
                    raise ValueError(f"part {name} {part} is not {length} contiguous elements")
            self._parts[id(parts)] = (parts, width, offset, key)
        if activation not in ACTIVATION_CODES:
            raise ValueError(f"activation {activation!r} is not one of {sorted(ACTIVATION_CODES)}")
        vecs = [None if v is None else _f32_vector(v, n) for v in (b_up, b_gate, gate_act, mask)]
        x = _f32_vector(x, length)
        a = torch.empty(n, dtype=torch.float32)
        y = torch.empty(length, dtype=torch.float32)
        self.lib.flashio_ffn(rows.data_ptr(), stride, n, length, code, offset["up"], offset.get("gate", -1), offset["down"],
                             ACTIVATION_CODES[activation], x.data_ptr(),
                             *[None if v is None else v.data_ptr() for v in vecs], a.data_ptr(), y.data_ptr())
        return y, a

    def predict(self, A: torch.Tensor, B: torch.Tensor, bias: torch.Tensor, x: torch.Tensor, thr: float) -> np.ndarray:
        """The neurons a low-rank predictor finds active for one token (rows.c's flashio_predict):
        ids (int64, ascending) where B (A x) + bias - thr > 0, rounded as the torch path rounds
        (dot, .to(dtype), + bias, - thr). A [r, D], B [N, r], bias [N]: one contiguous CPU dtype."""
        (r, d), (n, rb) = A.shape, B.shape
        code = DTYPE_CODES.get(A.dtype)
        if (code is None or rb != r or B.dtype != A.dtype or bias.dtype != A.dtype or bias.shape != (n,)
                or not (A.is_contiguous() and B.is_contiguous() and bias.is_contiguous())
                or A.device.type != "cpu" or B.device.type != "cpu" or bias.device.type != "cpu"):
            raise ValueError(f"predict takes contiguous CPU A [r, D], B [N, r], bias [N] of one float dtype, got "
                             f"{tuple(A.shape)} {A.dtype}, {tuple(B.shape)} {B.dtype}, {tuple(bias.shape)} {bias.dtype}")
        xf = _f32_vector(x.reshape(-1), d)
        h, z, ids = np.empty(r, np.float32), np.empty(n, np.float32), np.empty(n, np.int64)
        c = self.lib.flashio_predict(A.data_ptr(), r, d, B.data_ptr(), n, bias.data_ptr(), code, xf.data_ptr(), thr,
                                     h.ctypes.data, z.ctypes.data, ids.ctypes.data)
        return ids[:c]

    def attend1(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        """[H * Dh] float32: one query's attention (rows.c's flashio_attend1). q: [H, Dh]; k, v:
        [Hk, S, Dh] CPU views of one dtype whose keys are contiguous (a KV cache's first S positions),
        H a multiple of Hk (query head h reads key/value head h // (H / Hk)); scores, softmax and
        sums in float32."""
        h, dh = q.shape
        hk, s_len, kdh = k.shape
        if (k.shape != v.shape or kdh != dh or hk < 1 or h % hk or s_len < 1 or k.dtype != v.dtype
                or k.dtype not in DTYPE_CODES or k.device.type != "cpu" or v.device.type != "cpu"
                or k.stride(2) != 1 or v.stride(2) != 1):
            raise ValueError(f"attend1 takes q [H, Dh] and CPU k, v [Hk, S, Dh] of one float dtype with contiguous "
                             f"keys, got {tuple(q.shape)}, {tuple(k.shape)} {k.dtype}, {tuple(v.shape)} {v.dtype}")
        qf = q.to(torch.float32).contiguous()
        scores = torch.empty(h, s_len, dtype=torch.float32)
        out = torch.empty(h * dh, dtype=torch.float32)
        self.lib.flashio_attend1(qf.data_ptr(), h, hk, dh, k.data_ptr(), k.stride(0), k.stride(1), v.data_ptr(),
                                 v.stride(0), v.stride(1), s_len, DTYPE_CODES[k.dtype], scale, scores.data_ptr(),
                                 out.data_ptr())
        return out

    def rms(self, x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
        """Llama's RMSNorm of x's rows (rows.c's flashio_rms): w * (x * rsqrt(mean(x^2) + eps))
        rounded as transformers rounds it (x * r to x's dtype, then the product). x: [..., n]
        contiguous, w: [n] contiguous, both CPU float32/float16/bfloat16 of one dtype."""
        n = w.numel()
        if (x.dtype != w.dtype or x.dtype not in DTYPE_CODES or x.device.type != "cpu" or w.device.type != "cpu"
                or not x.is_contiguous() or not w.is_contiguous() or x.dim() < 1 or x.shape[-1] != n or n < 1):
            raise ValueError(f"rms takes contiguous CPU x [..., n] and w [n] of one float dtype, got "
                             f"{tuple(x.shape)} {x.dtype}, {tuple(w.shape)} {w.dtype}")
        out = torch.empty_like(x)
        self.lib.flashio_rms(x.data_ptr(), x.numel() // n, n, DTYPE_CODES[x.dtype], w.data_ptr(), eps, out.data_ptr())
        return out

    def rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotary embedding of x's rows at one position (rows.c's flashio_rope): x * cos +
        rotate_half(x) * sin, rounded as torch's ops round it. x: [..., Dh] contiguous; cos, sin:
        [Dh] contiguous, all CPU tensors of one float dtype, Dh even."""
        dh = x.shape[-1] if x.dim() else 0
        if (x.dtype not in DTYPE_CODES or cos.dtype != x.dtype or sin.dtype != x.dtype or dh < 2 or dh % 2
                or cos.shape != (dh,) or sin.shape != (dh,) or not (x.is_contiguous() and cos.is_contiguous()
                                                                    and sin.is_contiguous())
                or any(t.device.type != "cpu" for t in (x, cos, sin))):
            raise ValueError(f"rope takes contiguous CPU x [..., Dh] (Dh even), cos and sin [Dh] of x's float dtype, got "
                             f"{tuple(x.shape)} {x.dtype}, {tuple(cos.shape)} {cos.dtype}, {tuple(sin.shape)} {sin.dtype}")
        out = torch.empty_like(x)
        self.lib.flashio_rope(x.data_ptr(), x.numel() // dh, dh, DTYPE_CODES[x.dtype], cos.data_ptr(), sin.data_ptr(),
                              out.data_ptr())
        return out

    def i8_matvec(self, codes: torch.Tensor, scales: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """[out] float32: (codes [out, in] int8 * scales [out] fp16, per row) @ x [in]."""
        if (codes.device.type != "cpu" or codes.dtype != torch.int8 or codes.dim() != 2
                or not codes.is_contiguous()):
            raise ValueError(f"codes must be a contiguous 2-D int8 CPU tensor, got {codes.dtype} {tuple(codes.shape)}")
        if scales.shape != codes.shape[:1] or scales.dtype != torch.float16 or not scales.is_contiguous():
            raise ValueError(f"scales must be float16 [{codes.shape[0]}], got {scales.dtype} {tuple(scales.shape)}")
        x = _f32_vector(x, codes.shape[1])
        out = torch.empty(codes.shape[0], dtype=torch.float32)
        self.lib.flashio_i8_matvec(codes.data_ptr(), codes.shape[0], codes.shape[1], scales.data_ptr(), x.data_ptr(),
                                   out.data_ptr())
        return out

    def _qargs(self, rows: torch.Tensor, layout: QuantLayout, n: int) -> tuple:
        if rows.device.type != "cpu" or rows.dtype != torch.uint8 or rows.dim() != 2:
            raise ValueError(f"quantized rows are 2-D uint8 on the CPU, got {rows.dtype} {tuple(rows.shape)} on {rows.device}")
        if (rows.shape[1] > 1 and rows.stride(1) != 1) or (rows.shape[0] > 1 and rows.stride(0) < layout.row_bytes):
            raise ValueError("rows must be contiguous rows of at least row_bytes")
        if rows.shape[1] < layout.row_bytes or n > rows.shape[0]:
            raise ValueError(f"{n} rows of {layout.row_bytes} bytes asked of {tuple(rows.shape)}")
        return (rows.data_ptr(), rows.stride(0), n, layout.dim, layout.bits, layout.group, layout.codes,
                layout.scales, layout.offsets, layout.super_size)

    def qdot(self, rows: torch.Tensor, layout: QuantLayout, x: torch.Tensor, n: int | None = None, *,
             mask: torch.Tensor | None = None) -> torch.Tensor:
        """[n] float32: the part's dequantized rows[:n] @ x (x: [dim] float32); rows where `mask`
        ([n]) is 0 are not read and give 0."""
        n = rows.shape[0] if n is None else n
        args = self._qargs(rows, layout, n)
        x = _f32_vector(x, layout.dim)
        mask = None if mask is None else _f32_vector(mask, n)
        xg = torch.empty(layout.dim // layout.group, dtype=torch.float32)
        out = torch.empty(n, dtype=torch.float32)
        self.lib.flashio_qdot(*args, None if mask is None else mask.data_ptr(), x.data_ptr(), xg.data_ptr(),
                              out.data_ptr())
        return out

    def qaxpy(self, rows: torch.Tensor, layout: QuantLayout, a: torch.Tensor, n: int | None = None) -> torch.Tensor:
        """[dim] float32: a @ the part's dequantized rows[:n] (a: [n] float32); rows with a == 0 are not read."""
        n = rows.shape[0] if n is None else n
        args = self._qargs(rows, layout, n)
        a = _f32_vector(a, n)
        og = torch.empty(layout.dim // layout.group, dtype=torch.float32)
        y = torch.empty(layout.dim, dtype=torch.float32)
        self.lib.flashio_qaxpy(*args, a.data_ptr(), og.data_ptr(), y.data_ptr())
        return y


@dataclass(frozen=True)
class QuantLayout:
    """Where one part of a quantized row lies (flashio.quant.PartQuant with its RowQuant's figures)."""

    row_bytes: int
    dim: int
    bits: int  # 8 or 4
    group: int  # elements per scale
    codes: int  # byte positions in the row
    scales: int  # -1: the scale in the codes (symmetric int8, one per part; flashio.quant.RowQuant.embedded)
    offsets: int  # -1: none (int8: signed codes; int4: codes offset by 8)
    super_size: int = 0  # two-level scales (flashio.quant.RowQuant.sub_bits): elements per super-block

    def __post_init__(self) -> None:
        if self.bits not in (4, 8) or self.group <= 0 or self.dim % self.group or (self.bits == 4 and self.dim % 2):
            raise ValueError(f"unsupported quantized layout {self}")
        if self.scales < 0 and (self.bits != 8 or self.offsets >= 0 or self.group != self.dim or self.dim < 16
                                or self.super_size):
            raise ValueError(f"scales in the codes need symmetric int8 with one scale per part of >= 16: {self}")


Q8_BLOCK = 32  # rows.c's QB


def int8_activations(x: torch.Tensor) -> torch.Tensor:
    """x [len] (len % 32 == 0) as the kernels' int8 path sees it: each block of 32 elements rounded
    to a multiple of d = max |x| / 127 over the block (as llama.cpp's Q8_0), returned in float32."""
    xb = x.to(torch.float32).reshape(-1, Q8_BLOCK)
    amax = xb.abs().amax(dim=1, keepdim=True)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    return (torch.round(xb * inv).clamp(-127, 127) * (amax / 127.0)).reshape(-1)


def _f32_vector(v: torch.Tensor, length: int) -> torch.Tensor:
    if v.shape != (length,):
        raise ValueError(f"vector of shape {tuple(v.shape)}, expected ({length},)")
    if v.dtype is torch.float32 and v.is_contiguous():  # as it is: no dispatched no-op calls per kernel call
        return v
    return v.to(torch.float32).contiguous()


_default: Kernels | None = None


def kernels() -> Kernels | None:
    """The kernels of this machine's build, or None."""
    global _default
    if _default is None and library() is not None:
        _default = Kernels(library())
    return _default
