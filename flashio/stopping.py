"""Stop strings in streamed text, found across token boundaries.

    stops = StopChecker(["\\n\\n", "User:"])
    for piece in pieces:
        out, stopped = stops.feed(piece)
        emit(out)
        if stopped:
            break
    else:
        emit(stops.flush())

Only the tail of the text that could still become a stop string is held back (the longest suffix
that is a prefix of one of them); everything before it is emitted at once, so a stream without stop
strings is never delayed.
"""

from __future__ import annotations

from collections.abc import Sequence


class StopChecker:
    def __init__(self, stop: Sequence[str]):
        self.stop = tuple(s for s in stop if s)
        self._held = ""
        self.stopped = False
        self.matched: str | None = None  # the stop string that ended the text

    def feed(self, piece: str) -> tuple[str, bool]:
        """Add a piece of text; returns (text safe to emit, whether a stop string was reached).
        After a stop, the text up to (not including) the stop string has been emitted and later
        pieces are ignored."""
        if self.stopped:
            return "", True
        if not self.stop:
            return piece, False
        buf = self._held + piece
        hit = self._first_stop(buf)
        if hit is not None:
            at, s = hit
            self._held, self.stopped, self.matched = "", True, s
            return buf[:at], True
        keep = self._partial_suffix_len(buf)
        self._held = buf[len(buf) - keep:] if keep else ""
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        """The held-back text, at the end of the stream (it turned out not to be a stop string)."""
        out, self._held = ("" if self.stopped else self._held), ""
        return out

    def _first_stop(self, buf: str) -> tuple[int, str] | None:
        best: tuple[int, str] | None = None
        for s in self.stop:
            at = buf.find(s)
            if at >= 0 and (best is None or at < best[0]):
                best = (at, s)
        return best

    def _partial_suffix_len(self, buf: str) -> int:
        """Length of the longest suffix of buf that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(buf)), best, -1):
                if s.startswith(buf[len(buf) - n:]):
                    best = n
                    break
        return best
