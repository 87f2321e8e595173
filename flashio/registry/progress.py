"""Transfer progress: a tiny protocol and a terminal printer (no tqdm needed).

    progress = TerminalProgress(sys.stderr)
    registry.publish(artifact_dir, name="opt-125m", progress=progress)
    # ffn.safetensors   412.0/1024.0 MiB   387.2 MiB/s

Library code reports through the `Progress` protocol and defaults to `NullProgress`; only the
CLI (or an application) decides to print. Methods may be called from several threads.
"""

from __future__ import annotations

import threading
import time
from typing import Protocol, TextIO

_MiB = 1024 * 1024


class Progress(Protocol):
    """Receives one file transfer at a time: begin, any number of advances, end."""

    def begin(self, label: str, total_bytes: int) -> None: ...

    def advance(self, n_bytes: int) -> None: ...

    def end(self) -> None: ...


class NullProgress:
    """Reports nothing."""

    def begin(self, label: str, total_bytes: int) -> None:
        pass

    def advance(self, n_bytes: int) -> None:
        pass

    def end(self) -> None:
        pass


class TerminalProgress:
    """One line per file on `stream`: redrawn in place on a terminal, printed once when done otherwise."""

    def __init__(self, stream: TextIO, *, min_interval_s: float = 0.1):
        self.stream = stream
        self.min_interval_s = min_interval_s
        self._live = bool(getattr(stream, "isatty", lambda: False)())
        self._lock = threading.Lock()
        self._label = ""
        self._total = 0
        self._done = 0
        self._t0 = 0.0
        self._last_draw = 0.0

    def begin(self, label: str, total_bytes: int) -> None:
        with self._lock:
            self._label, self._total, self._done = label, total_bytes, 0
            self._t0 = self._last_draw = time.monotonic()
            if self._live:
                self._draw(self._t0, final=False)

    def advance(self, n_bytes: int) -> None:
        with self._lock:
            self._done += n_bytes
            now = time.monotonic()
            if self._live and now - self._last_draw >= self.min_interval_s:
                self._draw(now, final=False)

    def end(self) -> None:
        with self._lock:
            self._draw(time.monotonic(), final=True)

    def _draw(self, now: float, *, final: bool) -> None:
        self._last_draw = now
        elapsed_s = max(now - self._t0, 1e-6)
        rate_mibps = self._done / _MiB / elapsed_s
        line = (f"{self._label:<28} {self._done / _MiB:9.1f}/{self._total / _MiB:.1f} MiB "
                f"{rate_mibps:8.1f} MiB/s")
        if self._live:
            self.stream.write("\r" + line + ("\n" if final else ""))
        elif final:
            self.stream.write(line + f"  {elapsed_s:.1f}s\n")
        self.stream.flush()
