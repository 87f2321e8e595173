"""torch's intra-op thread count for a block of work: flashio.threads.torch_threads, which the
runtime's benchmarks use too (flashio may not import tasks, so the one definition lives there).

    with torch_threads(1):
        train(...)
"""

from __future__ import annotations

from flashio.threads import torch_threads

__all__ = ["torch_threads"]
