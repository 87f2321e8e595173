"""torch's intra-op thread count for a block of work.

    with torch_threads(1):
        train(...)

Per-token and small-batch work (the runtime stepping token by token, predictor training on
small matrices) runs fastest on one thread: each op is too small to split, and with two OpenMP
threads on a busy 2-core machine steps took 20-50x longer (the threads spin waiting for a core).
The setting is process-wide; the previous value is restored after the block.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    if n is None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)
