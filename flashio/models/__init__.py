"""Architectures flashio runs: one module per family, found by the checkpoint's `model_type`.

Each module exports `ModelArgs` (with `from_hf(config_dict)`), `read_checkpoint(ckpt, args)` (the
explicit table of checkpoint names -> flashio names) and `Model` (the runtime forward pass).
"""

from __future__ import annotations

import importlib
from types import ModuleType

from flashio.errors import UnsupportedArchitectureError

# model_type in config.json -> module implementing it
ARCHITECTURES: dict[str, str] = {
    "opt": "flashio.models.opt",
    "llama": "flashio.models.llama",
}


def get_architecture(model_type: str) -> ModuleType:
    """The module implementing `model_type`, or an error listing what is supported."""
    try:
        name = ARCHITECTURES[model_type]
    except KeyError:
        supported = ", ".join(sorted(ARCHITECTURES))
        raise UnsupportedArchitectureError(
            f"model_type {model_type!r} is not supported by flashio; supported: {supported}"
        ) from None
    return importlib.import_module(name)
