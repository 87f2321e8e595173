"""Architectures flashio runs: one module per family, found by the checkpoint's `model_type`.

Each family module declares everything about its family, and the rest of the project reads it:

| name | what | read by |
| --- | --- | --- |
| `MODEL_TYPES` | the config.json `model_type`s it implements | this registry |
| `ModelArgs` | frozen dataclass with `from_hf(config_dict)` | writer, reader, runtime |
| `read_checkpoint(ckpt, args)` | the explicit table of checkpoint names -> flashio names | writer |
| `FFN` | a `base.FFNSpec`: bundle parts, activation, the transformers module to hook | writer, pipeline |
| `Model` | the runtime forward pass of the resident part | runtime |
| `hf_config(dims, init_std=)` | a Hugging Face config of given `base.ConfigDims` | synth, test factories |
| `checkpoint_shapes(args)` | every Hugging Face tensor name and shape | synth |

Adding a family is one new module here (plus its test): the registry finds it by its
MODEL_TYPES, no table elsewhere lists it.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
from types import MappingProxyType, ModuleType

from flashio.errors import UnsupportedArchitectureError

# what every family module must define (see the table above)
REQUIRED = ("MODEL_TYPES", "ModelArgs", "read_checkpoint", "FFN", "Model", "hf_config", "checkpoint_shapes")
_NOT_FAMILIES = frozenset({"base"})  # shared pieces, not an architecture


@functools.cache
def architectures() -> MappingProxyType[str, ModuleType]:
    """model_type -> the module implementing it, over every family module of this package."""
    found: dict[str, ModuleType] = {}
    for info in pkgutil.iter_modules(__path__):
        if info.name in _NOT_FAMILIES:
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        missing = [n for n in REQUIRED if not hasattr(module, n)]
        if missing:
            raise UnsupportedArchitectureError(
                f"{module.__name__} is in flashio.models but lacks {missing}: every family module "
                f"declares {', '.join(REQUIRED)} (see flashio/models/__init__.py)")
        for model_type in module.MODEL_TYPES:
            if model_type in found:
                raise UnsupportedArchitectureError(
                    f"model_type {model_type!r} is declared by both {found[model_type].__name__} and "
                    f"{module.__name__}: keep it in one of them")
            found[model_type] = module
    return MappingProxyType(found)


def get_architecture(model_type: str) -> ModuleType:
    """The module implementing `model_type`, or an error listing what is supported."""
    families = architectures()
    try:
        return families[model_type]
    except KeyError:
        supported = ", ".join(sorted(families))
        raise UnsupportedArchitectureError(
            f"model_type {model_type!r} is not supported by flashio; supported: {supported}. "
            "A new family is one module in flashio/models declaring "
            f"{', '.join(REQUIRED)}") from None
