"""The pipeline's errors: subclasses of flashio's one error family, so that `flashio convert`
reports them like any other flashio failure (message, exit status 2, no traceback)."""

from __future__ import annotations

from flashio.errors import FlashError


class PipelineError(FlashError):
    """A conversion step failed for a reason the user can act on."""


class InputError(PipelineError):
    """Bad input found before the heavy work: a missing model, an unsupported architecture, a
    calibration spec that matches nothing, too few tokens, an inconsistent option."""


class AccuracyBudgetError(PipelineError):
    """The sparse model lost more accuracy than the budget allows; nothing was published."""

    def __init__(self, message: str, violations: list[str]):
        super().__init__(message)
        self.violations = violations


class StageResultError(PipelineError):
    """A stored stage result that cannot be read back safely (missing, damaged, tampered with, or
    of a type that is not a stage result): the stage runs again."""
