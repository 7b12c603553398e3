"""Stop sequences over streamed text: what may be shown now, and where the answer ends.

Text that could still become the start of a stop sequence is held back until the next piece
decides, so a stop sequence is never shown, even when it arrives split across tokens.
"""

from __future__ import annotations

from collections.abc import Sequence


class StopText:
    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(stops)
        self.held = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        """Add a piece of answer; returns the text that can be shown now (nothing after a stop)."""
        if self.stopped:
            return ""
        self.held += text
        ends = [self.held.find(stop) for stop in self.stops if stop in self.held]
        if ends:
            self.stopped = True
            shown, self.held = self.held[: min(ends)], ""
            return shown
        keep = max((self._partial(stop) for stop in self.stops), default=0)
        shown, self.held = self.held[: len(self.held) - keep], self.held[len(self.held) - keep:]
        return shown

    def flush(self) -> str:
        """At the answer's end: whatever was held back is answer text after all."""
        shown, self.held = self.held, ""
        return "" if self.stopped else shown

    def _partial(self, stop: str) -> int:
        """The longest end of the held text that begins `stop`."""
        for size in range(min(len(stop) - 1, len(self.held)), 0, -1):
            if self.held.endswith(stop[:size]):
                return size
        return 0
