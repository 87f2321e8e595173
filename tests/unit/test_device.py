"""Device selection and the flash -> device transfer path.

The engines reach the device only through flashio.device's TransferPath. On the CPU the path is
trivial (reads land in the rows), so the staged path that CUDA takes is also run here through
`StagedTransfer`: a CPU stand-in whose asynchrony is made visible (uploads are applied only when
the engine orders its compute after them; staging buffers are filled with NaN first; row ids are
snapshots). An engine that computed before `before_compute`, read its rows from the staging, or
forgot an upload gives wrong logits here. The CUDA tests (marked gpu) skip without CUDA.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import flashio
from flashio.arena import AlignedArena
from flashio.cache import WindowCache
from flashio.config import FlashConfig
from flashio.device import DeviceTimes, HostTransfer, resolve_device, transfer_path
from flashio.errors import FlashError
from flashio.format import Artifact, write_artifact
from flashio.predictor import PredictorWeights
from flashio.runtime import FlashModel

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
PROMPT = [2, 17, 101, 55, 9, 240, 33, 78, 12, 5]


class StagedTransfer:
    """The CUDA path's protocol on the CPU, with late uploads (see the module docstring)."""

    device = torch.device("cpu")
    in_place = False

    def __init__(self, staging_bytes: int):
        self.arena = AlignedArena(max(staging_bytes, 4096))
        self.pending: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.uploads = self.ordered = self.id_calls = 0

    def staging(self, m: int, dest: torch.Tensor) -> tuple[torch.Tensor, int]:
        assert not self.pending, "staging reused before the previous upload was ordered"
        nbytes = dest.numel() * dest.element_size()
        host = self.arena.tensor(torch.uint8, (nbytes,)).view(dest.dtype).view(dest.shape)
        host.fill_(float("nan"))  # whatever the reader does not write stays poison
        return host, 0

    def fence(self) -> None:
        pass

    def upload(self, slot: int, host: torch.Tensor, dest: torch.Tensor) -> None:
        assert host.data_ptr() != dest.data_ptr()
        self.pending.append((host, dest))
        self.uploads += 1

    def before_compute(self) -> None:
        for host, dest in self.pending:  # the copy "runs" only now
            dest.copy_(host)
        self.ordered += len(self.pending)
        self.pending.clear()

    def indices(self, *arrays: np.ndarray) -> tuple[torch.Tensor, ...]:
        self.id_calls += 1
        return tuple(torch.from_numpy(a.copy()) for a in arrays)  # snapshots, as a device copy

    def span(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def begin_step(self) -> None:
        assert not self.pending, "an upload of the previous step was never ordered"

    def finish_step(self) -> DeviceTimes:
        assert not self.pending, "an upload was never ordered before the compute"
        return DeviceTimes()

    def host_bytes(self) -> int:
        return self.arena.nbytes

    def close(self) -> None:
        self.arena.close()


def _all_active(n_layers: int, dim: int, n: int) -> list[PredictorWeights]:
    return [PredictorWeights(torch.zeros(4, dim), torch.zeros(n, 4), torch.full((n,), 20.0), 0.5)
            for _ in range(n_layers)]


@pytest.fixture(scope="module")
def sparse_artifact(tiny_opt, tmp_path_factory):
    rng = np.random.default_rng(0)
    return write_artifact(tiny_opt[1], tmp_path_factory.mktemp("dev") / "art",
                          orders=[rng.permutation(256) for _ in range(2)], predictors=_all_active(2, 64, 256))


def _staged_model(path, mode: str, *, window: int = 2, **kw) -> tuple[FlashModel, StagedTransfer]:
    art = Artifact(path)
    width = art.manifest.ffn_layers[0].bundle_width * art.manifest.itemsize
    transfer = StagedTransfer(256 * width)
    model = FlashModel(art, FlashConfig(mode=mode, window=window, **kw), transfer=transfer)
    return model, transfer


@pytest.fixture(scope="module")
def dense_ref(sparse_artifact):
    with flashio.open(sparse_artifact, mode="dense") as model:
        return model.forward(PROMPT, token_by_token=True)


def test_cpu_and_bad_names():
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(FlashError, match="not supported"):
        resolve_device("meta")
    with pytest.raises(FlashError, match="not a device name"):
        resolve_device("warp-drive")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_absent_is_one_clear_error(sparse_artifact):
    with pytest.raises(FlashError, match="CUDA is not available on this machine"):
        resolve_device("cuda")
    with pytest.raises(FlashError, match=r"CUDA is not available on this machine.*use device='cpu'"):
        flashio.open(sparse_artifact, device="cuda")


def test_host_path_reads_straight_into_the_cache_rows():
    path = transfer_path(torch.device("cpu"), staging_bytes=8 * 16, index_capacity=8)
    assert isinstance(path, HostTransfer) and path.in_place
    dest = torch.zeros(3, 4)
    host, _ = path.staging(3, dest)
    assert host.data_ptr() == dest.data_ptr()
    ids = np.array([3, 1, 2])
    (t,) = path.indices(ids)
    assert t.data_ptr() == ids.ctypes.data  # a view, no copy
    assert path.finish_step() == DeviceTimes() and path.host_bytes() == 0


@pytest.mark.parametrize(("mode", "kw"), [
    ("dense", {}), ("naive", {}), ("naive", {"pinned_fraction": 0.3}), ("oracle", {}),
    ("oracle", {"overlap": True}), ("oracle", {"bundled": False}),
    ("sparse", {}), ("sparse", {"reuse": False}),
])
def test_staged_path_equals_dense(sparse_artifact, dense_ref, mode, kw):
    model, transfer = _staged_model(sparse_artifact, mode, **kw)
    with model:
        got = model.forward(PROMPT, token_by_token=True)
        assert model.engine.transfer is transfer
    assert (got - dense_ref).abs().max().item() <= 1e-5
    if mode != "dense":  # every flash read went through the staging and an ordered upload
        assert transfer.uploads > 0 and transfer.ordered == transfer.uploads
    if mode in ("sparse", "oracle"):
        assert transfer.id_calls > 0


@pytest.mark.parametrize("mode", ["dense", "naive", "oracle"])
def test_staged_path_on_a_gated_model(llama_artifact, mode):
    """Llama (SwiGLU: gate + up + down bundles, grouped-query attention) through the staged path,
    also computed in bfloat16 (landing buffer + conversion on the device)."""
    with flashio.open(llama_artifact, mode=mode, window=2) as host_model:
        want = host_model.forward(PROMPT, token_by_token=True)
    model, transfer = _staged_model(llama_artifact, mode)
    with model:
        assert (model.forward(PROMPT, token_by_token=True) - want).abs().max().item() <= 1e-5
    assert mode == "dense" or transfer.uploads > 0
    model, _ = _staged_model(llama_artifact, mode, compute_dtype=torch.bfloat16)
    with model:
        low = model.forward(PROMPT, token_by_token=True)
    assert (low - want).abs().max().item() <= 0.05 * want.abs().max().item()


def test_staged_path_converts_dtype_on_the_device(sparse_artifact):
    """A float32 artifact computed in bfloat16: rows land in the device's landing buffer and one
    copy converts them into the appended cache rows (the CPU path uses FillingWindowCache)."""
    with flashio.open(sparse_artifact, mode="sparse", compute_dtype="bfloat16", window=2) as host_model:
        want = host_model.forward(PROMPT, token_by_token=True)
    model, transfer = _staged_model(sparse_artifact, "sparse", compute_dtype=torch.bfloat16)
    with model:
        assert model.engine.landing is not None and model.engine.landing.dtype == torch.float32
        got = model.forward(PROMPT, token_by_token=True)
    assert torch.equal(got, want)  # the same bf16 arithmetic, rows in another order: same sums here
    assert transfer.uploads > 0


def test_staged_greedy_generation_matches_cpu_over_64_tokens(sparse_artifact):
    with flashio.open(sparse_artifact, mode="dense") as model:
        want = model.generate(PROMPT[:4], max_new_tokens=64, stop_at_eos=False).token_ids
    model, _ = _staged_model(sparse_artifact, "sparse", window=3)
    with model:
        got = model.generate(PROMPT[:4], max_new_tokens=64, stop_at_eos=False).token_ids
    assert got == want and len(got) == 64


@settings(max_examples=60, deadline=None)
@given(window=st.integers(1, 4), steps=st.lists(st.sets(st.integers(0, 29), max_size=12), min_size=1, max_size=20))
def test_cache_invariants_with_snapshot_indices(window, steps):
    """The cache's row moves with ids passed as copies (as a device's index buffer) keep every
    row holding its own neuron's bundle."""
    cache = WindowCache(torch.full((16, 2), -1.0), 30, window,
                        indices=lambda *a: tuple(torch.from_numpy(x.copy()) for x in a))
    for active_set in steps:
        active = np.array(sorted(active_set), dtype=np.int64)
        up = cache.update(active)
        cache.matrix[up.start : up.start + len(up.missing)] = torch.from_numpy(up.missing).float()[:, None]
        for slot, neuron in enumerate(cache.neurons.tolist()):
            assert cache.slot_of[neuron] == slot and torch.all(cache.matrix[slot] == neuron)


class _FakeCuda:
    """Just enough of torch.cuda's API for CudaTransfer's bookkeeping to run on the CPU: events,
    streams and host registration are recorded, copies are synchronous. It checks the logic
    (registration, buffer layout, the id ring, event reuse, timing sums), not CUDA's semantics:
    the tests marked gpu do that."""

    def __init__(self, register_error: int = 0):
        self.registered: dict[int, int] = {}
        self.flags: list[int] = []
        self.events: list = []
        fake = self

        class Event:
            def __init__(self, enable_timing=False):
                self.timing, self.recorded, self.waits = enable_timing, 0, 0
                fake.events.append(self)

            def record(self, stream=None):
                self.recorded += 1

            def synchronize(self):
                self.waits += 1

            def elapsed_time(self, end):
                assert self.timing and end.timing and self.recorded and end.recorded
                return 2.0  # ms

        class Stream:
            def __init__(self, device=None):
                self.waited = []

            def wait_stream(self, other):
                self.waited.append(other)

            def wait_event(self, event):
                self.waited.append(event)

        class Runtime:
            def cudaHostRegister(self, ptr, nbytes, flags):
                fake.flags.append(flags)
                if register_error:
                    return register_error
                fake.registered[ptr] = nbytes
                return 0

            def cudaHostUnregister(self, ptr):
                del fake.registered[ptr]
                return 0

        self.Event, self.Stream, self.runtime = Event, Stream, Runtime()
        self.current = Stream()

    def install(self, monkeypatch):
        monkeypatch.setattr(torch.cuda, "Event", self.Event)
        monkeypatch.setattr(torch.cuda, "Stream", self.Stream)
        monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
        monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: self.current)
        monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
        monkeypatch.setattr(torch.cuda, "cudart", lambda: self.runtime)
        monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())


def test_cuda_transfer_bookkeeping_with_a_fake_runtime(monkeypatch, sparse_artifact, dense_ref):
    from flashio.device import CudaTransfer

    fake = _FakeCuda()
    fake.install(monkeypatch)
    art = Artifact(sparse_artifact)
    row_bytes = art.manifest.ffn_layers[0].bundle_width * art.manifest.itemsize
    path = CudaTransfer(torch.device("cpu"), staging_bytes=256 * row_bytes, index_capacity=512)
    (ptr, nbytes), = fake.registered.items()  # one registration: staging buffers + id ring
    assert fake.flags == [1]  # cudaHostRegisterPortable: pinned whichever device is current
    assert ptr % 4096 == 0 and nbytes == path.host_bytes() >= 2 * 256 * row_bytes + 4 * 512 * 8
    model = FlashModel(art, FlashConfig(mode="sparse", window=2), transfer=path)
    with model:
        got = model.forward(PROMPT, token_by_token=True)
        for host in [*path._bufs, path._ids_host]:  # everything DMA touches lies in the registered range
            assert ptr <= host.data_ptr() and host.data_ptr() + host.numel() * host.element_size() <= ptr + nbytes
        assert path._bufs[1].data_ptr() - path._bufs[0].data_ptr() == path.slot_bytes
        loads = [s for s in model.stats if s.neurons_loaded]
        assert loads and all(s.upload_ms == 2.0 * 2 for s in loads)  # 2 fake ms per upload, one per layer
        assert all(s.upload_ms == 0.0 for s in model.stats if not s.neurons_loaded)
        assert len({id(e) for e in path._timers}) == len(path._timers) <= 16  # reused, not one per step
    assert (got - dense_ref).abs().max().item() <= 1e-5
    assert not fake.registered  # unregistered on close
    assert fake.current.waited and path.stream.waited  # compute waited on uploads, copies on compute
    assert path._n_timers == 0 and not path._upload_spans  # finish_step left nothing for the next step


def test_cuda_transfer_registration_failure_is_a_clear_error(monkeypatch):
    from flashio.device import CudaTransfer

    _FakeCuda(register_error=2).install(monkeypatch)
    with pytest.raises(FlashError, match=r"cudaHostRegister of \d+ bytes failed \(error 2\).*ulimit -l"):
        CudaTransfer(torch.device("cpu"), staging_bytes=1 << 20, index_capacity=16)


# -- CUDA --------------------------------------------------------------------------------------
@pytest.mark.gpu
@needs_cuda
def test_cuda_staging_is_pinned_aligned_and_uploads_in_order():
    dev = resolve_device("cuda")
    path = transfer_path(dev, staging_bytes=16 * 256 * 2, index_capacity=64)
    dest = torch.zeros(40, 256, dtype=torch.float16, device=dev)
    want = []
    for k in range(5):  # more uploads than buffers: reuse must wait for the earlier copies
        host, slot = path.staging(8, dest[8 * k : 8 * k + 8])
        assert host.data_ptr() % 4096 == 0
        host.copy_(torch.randn(8, 256).half())
        want.append(host.clone())
        path.upload(slot, host, dest[8 * k : 8 * k + 8])
    path.before_compute()
    ids = [np.arange(k, k + 10, dtype=np.int64) for k in range(6)]  # more calls than ring slots
    got = [path.indices(a, a[::-1].copy()) for a in ids]
    times = path.finish_step()
    assert torch.equal(dest.cpu(), torch.cat(want))
    assert got[-1][0].device == dev and got[-1][1].tolist() == ids[-1][::-1].tolist()
    assert times.upload_s > 0
    path.close()


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("mode", ["oracle", "sparse", "naive", "dense"])
def test_cuda_modes_match_cpu_dense(sparse_artifact, dense_ref, mode):
    with flashio.open(sparse_artifact, mode=mode, device="cuda", window=2) as model:  # float32
        got = model.forward(PROMPT, token_by_token=True).cpu()
    assert (got - dense_ref).abs().max().item() <= 1e-4
    with flashio.open(sparse_artifact, mode=mode, device="cuda", window=2, compute_dtype="bfloat16") as model:
        low = model.forward(PROMPT, token_by_token=True).cpu()
    scale = dense_ref.abs().max().item()
    assert (low - dense_ref).abs().max().item() <= 0.05 * scale  # bf16 tolerance
    assert (low.argmax(-1) == dense_ref.argmax(-1)).float().mean().item() >= 0.9


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("mode", ["sparse", "dense"])
def test_cuda_quantized_rows_match_cpu(tiny_opt, tmp_path, scheme, mode):
    """Quantized bundle rows (int8 with its scale in the codes, int4 groups) decoded on the GPU
    (flashio.quant's torch path) give the CPU's logits (its one-token kernels)."""
    rng = np.random.default_rng(0)
    art = write_artifact(tiny_opt[1], tmp_path / scheme, dtype="float32", quantize=scheme,
                         orders=[rng.permutation(256) for _ in range(2)], predictors=_all_active(2, 64, 256))
    with flashio.open(art, mode=mode, window=2) as model:
        want = model.forward(PROMPT, token_by_token=True)
    with flashio.open(art, mode=mode, device="cuda", window=2) as model:
        got = model.forward(PROMPT, token_by_token=True).cpu()
    # the CPU's dot products round x to int8 blocks where the CPU has VNNI: a small difference
    assert (got - want).abs().max().item() <= 0.02 * want.abs().max().item()
    assert (got.argmax(-1) == want.argmax(-1)).float().mean().item() >= 0.9


@pytest.mark.gpu
@needs_cuda
def test_cuda_greedy_generation_matches_cpu_over_64_tokens(sparse_artifact):
    with flashio.open(sparse_artifact, mode="dense") as model:
        want = model.generate(PROMPT[:4], max_new_tokens=64, stop_at_eos=False).token_ids
    with flashio.open(sparse_artifact, mode="sparse", device="cuda", window=3) as model:
        gen = model.generate(PROMPT[:4], max_new_tokens=64, stop_at_eos=False)
        assert model.staging_bytes > 0
    assert gen.token_ids == want
    assert all(s.total_ms > 0 for s in gen.decode)


@pytest.mark.gpu
@needs_cuda
def test_cuda_cache_updates_hold_invariants_without_allocating():
    dev = resolve_device("cuda")
    n, cap = 400, 200
    path = transfer_path(dev, staging_bytes=cap * 64 * 4, index_capacity=2 * cap)
    cache = WindowCache(torch.full((cap, 64), -1.0, device=dev), n, 3, indices=path.indices)
    cache._scratch = torch.empty(cap, 64, device=dev)
    rng = np.random.default_rng(0)
    stats = None
    for step in range(60):
        active = np.sort(rng.choice(n, size=int(rng.integers(10, 60)), replace=False)).astype(np.int64)
        if step == 20:
            torch.cuda.synchronize(dev)
            stats = torch.cuda.memory_stats(dev)
        up = cache.update(active)
        m = len(up.missing)
        host, slot = path.staging(m, cache.matrix[up.start : up.start + m])
        host.copy_(torch.from_numpy(up.missing).float()[:, None].expand(m, 64))
        path.upload(slot, host, cache.matrix[up.start : up.start + m])
        path.before_compute()
        path.finish_step()
        rows = cache.matrix.cpu()[: cache.n_used, 0].numpy()  # whole matrix: a strided copy would allocate
        assert np.array_equal(rows, cache.neurons.astype(np.float32))  # each row holds its neuron
    after = torch.cuda.memory_stats(dev)
    # 40 steps of moves, uploads and id transfers: not one block from the caching allocator
    assert after["allocation.all.allocated"] == stats["allocation.all.allocated"]
    path.close()


@pytest.mark.gpu
@needs_cuda
def test_cuda_decoding_allocates_no_new_device_memory(sparse_artifact):
    with flashio.open(sparse_artifact, mode="sparse", device="cuda", window=3) as model:
        model.generate(PROMPT[:4], max_new_tokens=8, stop_at_eos=False)  # warm-up: allocator pools
        before = torch.cuda.memory_stats()["segment.all.allocated"]
        model.generate(PROMPT[:4], max_new_tokens=32, stop_at_eos=False)
        after = torch.cuda.memory_stats()["segment.all.allocated"]
    assert after == before  # no cudaMalloc per token
