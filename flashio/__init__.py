"""flashio: run large language models whose FFN weights live on flash.

    import flashio
    model = flashio.open("path/to/artifact", mode="sparse", window=5)
    print(model.generate("def fibonacci(n):", max_new_tokens=32).text)

    cfg = flashio.FlashConfig(mode="sparse", dram_budget="2GiB")   # the options as one value
    model = flashio.open("path/to/artifact", cfg, window=3)        # keywords override its fields
"""

from flashio.errors import (
    BudgetError,
    ChecksumError,
    FlashError,
    FlashReadError,
    FormatError,
    MissingExtraError,
    RegistryError,
    TokenizerError,
    UnsupportedArchitectureError,
)
from flashio.version import __version__

__all__ = [
    "BudgetError",
    "ChecksumError",
    "FlashConfig",
    "FlashError",
    "FlashReadError",
    "FormatError",
    "MissingExtraError",
    "Mode",
    "RegistryError",
    "TokenizerError",
    "UnsupportedArchitectureError",
    "__version__",
    "open",
]


def open(path, config=None, *, registry=None, active_source=None, **overrides):
    """Open an artifact (a directory or a registry reference) for inference.

    `config` is a FlashConfig; keywords are FlashConfig fields that override it (or the defaults):
    flashio.open(path, mode="dense", window=3). See :func:`flashio.runtime.open_model`.
    """
    from flashio.runtime import open_model

    return open_model(path, config, registry=registry, active_source=active_source, **overrides)


def __getattr__(name):
    # FlashConfig and Mode are loaded on first use: `import flashio` stays free of torch
    if name in ("FlashConfig", "Mode"):
        from flashio import config

        return getattr(config, name)
    raise AttributeError(f"module 'flashio' has no attribute {name!r}")
