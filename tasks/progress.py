"""Progress of a long stage: a Prefect progress artifact inside a run, a bar on the terminal.

    with StageProgress("activations shard 2/4", total=32) as progress:
        for batch in batches:
            ...
            progress.advance(len(batch))

Plain task functions take a `progress(done, total)` callable and know nothing of either; the
@task wrappers pass `StageProgress.update`. The terminal bar (tqdm, on stderr) is drawn when
$FLASHIO_PROGRESS is "bar" (what `flashio convert` sets), or when it is unset and stderr is a
terminal; "none" turns it off. Artifact updates are throttled to one per second.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any

log = logging.getLogger(__name__)

PROGRESS_ENV = "FLASHIO_PROGRESS"
_MIN_UPDATE_S = 1.0


def terminal_bar_enabled() -> bool:
    mode = os.environ.get(PROGRESS_ENV, "").strip().lower()
    if mode in ("bar", "1", "true", "yes"):
        return True
    if mode in ("none", "0", "false", "no"):
        return False
    return sys.stderr.isatty()


class StageProgress:
    """Progress of one stage, reported to Prefect (when in a run) and to the terminal."""

    def __init__(self, label: str, total: int, *, unit: str = "it"):
        self.label, self.total, self.done = label, max(int(total), 1), 0
        self._artifact_id: Any = None
        self._last_update = 0.0
        self._bar = None
        if terminal_bar_enabled():
            from tqdm import tqdm

            self._bar = tqdm(total=self.total, desc=label, unit=unit, file=sys.stderr, leave=False,
                             dynamic_ncols=True)
        try:
            from prefect.artifacts import create_progress_artifact
            from prefect.context import get_run_context

            get_run_context()  # raises outside a flow or task run
            self._artifact_id = create_progress_artifact(progress=0.0, description=label)
        except Exception as exc:  # outside a run, or the API is unreachable: progress is optional
            log.debug("no Prefect progress artifact for %r: %s", label, exc)

    def update(self, done: int, total: int | None = None) -> None:
        """Set the absolute progress (the signature of the plain functions' `progress` callable)."""
        if total is not None:
            self.total = max(int(total), 1)
            if self._bar is not None:
                self._bar.total = self.total
        step = done - self.done
        self.done = done
        if self._bar is not None and step:
            self._bar.update(step)
        now = time.monotonic()
        if self._artifact_id is not None and (now - self._last_update >= _MIN_UPDATE_S or done >= self.total):
            self._last_update = now
            try:
                from prefect.artifacts import update_progress_artifact

                update_progress_artifact(self._artifact_id, progress=min(100.0, 100.0 * done / self.total))
            except Exception as exc:
                log.debug("progress artifact update failed: %s", exc)

    def advance(self, n: int = 1) -> None:
        self.update(self.done + n)

    def close(self, *, completed: bool = True) -> None:
        if completed and self.done < self.total:
            self.update(self.total)
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> StageProgress:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        self.close(completed=exc_type is None)
