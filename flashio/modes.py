"""What each mode runs: the mode -> FFN engine table.

    engine_class(Mode.SPARSE).memory(manifest, torch.bfloat16)   # what it holds (flashio.budget)
    engine_class(config.mode).create(ctx, config, capacity=..., predictors=..., source=...)

A new mode is one engine class (flashio.engines) and one line here.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from flashio.config import Mode
from flashio.engines import DenseEngine, Engine, MmapEngine, NaiveEngine
from flashio.sparse import OracleEngine, SparseEngine

ENGINES: Mapping[Mode, type[Engine]] = MappingProxyType({
    Mode.DENSE: DenseEngine,
    Mode.NAIVE: NaiveEngine,
    Mode.SPARSE: SparseEngine,
    Mode.ORACLE: OracleEngine,
    Mode.MMAP: MmapEngine,
})


def engine_class(mode: Mode | str) -> type[Engine]:
    """The engine class of `mode` (a Mode or its name)."""
    return ENGINES[Mode(mode)]
