"""Device selection and the flash -> device transfer path (GPU parts skip without CUDA)."""

from __future__ import annotations

import pytest
import torch

from flashio.device import HostTransfer, resolve_device, transfer_path
from flashio.errors import FlashError

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_cpu_and_bad_names():
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(FlashError, match="not supported"):
        resolve_device("meta")
    with pytest.raises(FlashError, match="not a device name"):
        resolve_device("warp-drive")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_absent_is_one_clear_error():
    with pytest.raises(FlashError, match="CUDA is not available on this machine"):
        resolve_device("cuda")


def test_host_path_reads_straight_into_the_cache_rows():
    path = transfer_path(torch.device("cpu"), max_rows=8, row_width=4, dtype=torch.float32)
    assert isinstance(path, HostTransfer)
    dest = torch.zeros(3, 4)
    host, slot = path.staging(3, dest)
    assert host.data_ptr() == dest.data_ptr()
    host.fill_(7.0)
    path.upload(slot, host, dest)
    path.before_compute()
    assert torch.all(dest == 7.0)


@pytest.mark.gpu
@needs_cuda
def test_cuda_staging_is_pinned_aligned_and_uploads_in_order():
    dev = resolve_device("cuda")
    path = transfer_path(dev, max_rows=16, row_width=256, dtype=torch.float16)
    dest = torch.zeros(40, 256, dtype=torch.float16, device=dev)
    want = []
    for k in range(5):  # more uploads than buffers: reuse must wait for the earlier copies
        host, slot = path.staging(8, dest[8 * k : 8 * k + 8])
        assert host.data_ptr() % 4096 == 0 or (host.data_ptr() % 512 == 0)
        host.copy_(torch.randn(8, 256).half())
        want.append(host.clone())
        path.upload(slot, host, dest[8 * k : 8 * k + 8])
    path.before_compute()
    assert torch.equal(dest.cpu(), torch.cat(want))
    path.close()
