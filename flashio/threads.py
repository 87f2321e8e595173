"""torch's intra-op thread count for a block of work, restored afterwards (it is process-wide).

    with torch_threads(1):
        train(...)

Per-token and small-batch work (the runtime stepping token by token, predictor training on
small matrices) runs fastest on one thread: each op is too small to split, and with two OpenMP
threads on a busy 2-core machine steps took 20-50x longer (the threads spin waiting for a core).
The benchmarks measure bandwidth per thread count with it (flashio.bench.bandwidth) and run a
model bench's configurations at the count asked for (flashio.bench.model); the pipeline's stages
use it through tasks.threads.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """torch.set_num_threads(n) inside the block (None: torch's count as it is), the previous count
    restored after."""
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)
