"""The one error family of flashio.

Every failure a user can cause (a bad artifact, a budget too small, a missing extra) raises a
subclass of :class:`FlashError` whose message says what failed, the value seen, what was expected
and, where there is one, the fix.
"""

from __future__ import annotations


class FlashError(Exception):
    """Base class of every error flashio raises on purpose."""


class FormatError(FlashError):
    """An artifact is malformed: unknown version, bad manifest, offsets outside a file..."""


class ChecksumError(FormatError):
    """A file's sha256 does not match the one recorded in the manifest."""


class UnsupportedArchitectureError(FlashError):
    """The checkpoint's `model_type` has no flashio implementation."""


class BudgetError(FlashError):
    """The DRAM budget is too small for the requested mode."""


class FlashReadError(FlashError):
    """A read from the flash-resident FFN file failed or came back short."""


class TokenizerError(FlashError):
    """Text was given but the artifact carries no tokenizer, or the tokenizer is unusable."""


class RegistryError(FlashError):
    """A registry operation failed (missing version, refused publish, transfer error...)."""


class MissingExtraError(FlashError):
    """A feature needs an optional dependency group that is not installed."""

    def __init__(self, feature: str, extra: str, missing_module: str | None = None):
        self.feature = feature
        self.extra = extra
        self.missing_module = missing_module
        detail = f" (module {missing_module!r} is not installed)" if missing_module else ""
        super().__init__(
            f"{feature} needs the '{extra}' extra{detail}: pip install 'flashio[{extra}]'"
        )
