"""flashio: run large language models whose FFN weights live on flash.

    import flashio
    model = flashio.open("path/to/artifact", mode="sparse", window=5)
    print(model.generate("def fibonacci(n):", max_new_tokens=32).text)
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
    "FlashError",
    "FlashReadError",
    "FormatError",
    "MissingExtraError",
    "RegistryError",
    "TokenizerError",
    "UnsupportedArchitectureError",
    "__version__",
    "open",
]


def open(path, **kwargs):
    """Open an artifact (a directory or a registry reference) for inference.

    See :func:`flashio.runtime.open_model` for the options.
    """
    from flashio.runtime import open_model

    return open_model(path, **kwargs)
