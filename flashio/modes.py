"""What each mode runs: the (mode, selection) -> FFN engine table.

    engine_class(Mode.SPARSE).memory(manifest, torch.bfloat16)   # what it holds (flashio.budget)
    engine_for(config, manifest).create(ctx, config, capacity=..., predictors=..., source=...)

A new mode is one engine class (flashio.engines) and one line here; a new way of choosing a
windowed mode's neurons (flashio.config.Selection) is one engine class and one line of VARIANTS.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from flashio.config import FlashConfig, Mode, Selection, resolve_selection
from flashio.engines import DenseEngine, Engine, MmapEngine, NaiveEngine
from flashio.exact import (
    ContributionOracleEngine,
    GateEngine,
    GatePredictorEngine,
    GateUpEngine,
    OracleEngine,
)
from flashio.format import Manifest
from flashio.sparse import SparseEngine

ENGINES: Mapping[Mode, type[Engine]] = MappingProxyType({  # each mode's engine with its default selection
    Mode.DENSE: DenseEngine,
    Mode.NAIVE: NaiveEngine,
    Mode.SPARSE: SparseEngine,
    Mode.ORACLE: OracleEngine,
    Mode.MMAP: MmapEngine,
})
VARIANTS: Mapping[tuple[Mode, Selection], type[Engine]] = MappingProxyType({
    (Mode.SPARSE, Selection.GATE): GateEngine,
    (Mode.SPARSE, Selection.GATE_PREDICTOR): GatePredictorEngine,
    (Mode.SPARSE, Selection.GATE_UP): GateUpEngine,
    (Mode.ORACLE, Selection.CONTRIBUTION): ContributionOracleEngine,
})


def engine_class(mode: Mode | str, selection: Selection | str | None = None) -> type[Engine]:
    """The engine class of `mode` (a Mode or its name) choosing neurons by `selection` (None: the mode's)."""
    mode = Mode(mode)
    if selection is None:
        return ENGINES[mode]
    return VARIANTS.get((mode, Selection(selection)), ENGINES[mode])


def engine_for(config: FlashConfig, manifest: Manifest) -> type[Engine]:
    """The engine `config` runs on the artifact of `manifest` (its selection checked against the artifact)."""
    return engine_class(config.mode, resolve_selection(config, manifest))
