"""Progress of the long computations a user waits for (documents' prefill, drafter chunk KV)."""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass, field

from tqdm import tqdm

from app.events import Preparing


@dataclass
class Job:
    """One computation over `total` tokens; updated from the thread that computes it, read by the
    requests that wait for it."""

    what: str
    total: int
    done: int = 0
    started: float = field(default_factory=time.perf_counter)
    finished: threading.Event = field(default_factory=threading.Event)

    def update(self, done: int, total: int) -> Preparing:
        self.done, self.total = done, total
        return self.event()

    def event(self) -> Preparing:
        elapsed = time.perf_counter() - self.started
        rate = self.done / elapsed if self.done and elapsed > 0 else None
        eta = (self.total - self.done) / rate if rate else None
        return Preparing(self.what, self.done, self.total, rate, eta)


def cli_bar(what: str, total: int) -> tqdm:
    """tqdm on stderr in tokens: done/total, tokens/s and the remaining time."""
    return tqdm(total=total, desc=what, unit="tok", unit_scale=True, file=sys.stderr, dynamic_ncols=True)


def describe(event: Preparing) -> str:
    """'Reading documents: 4,096 / 20,614 tokens (20%), 71 tokens/s, about 3 min 53 s left'."""
    share = f" ({event.done / event.total:.0%})" if event.total else ""
    text = f"{event.what}: {event.done:,} / {event.total:,} tokens{share}"
    if event.tokens_per_s:
        text += f", {event.tokens_per_s:,.0f} tokens/s"
    if event.eta_s is not None:
        minutes, seconds = divmod(int(event.eta_s), 60)
        text += f", about {minutes} min {seconds} s left" if minutes else f", about {seconds} s left"
    return text


class PreparingBars:
    """Preparing events shown as tqdm bars on stderr (the CLI), one bar per computation."""

    def __init__(self) -> None:
        self.bar: tqdm | None = None
        self.what = ""

    def show(self, event: Preparing) -> None:
        if self.bar is None or event.what != self.what:
            self.close()
            self.bar, self.what = cli_bar(event.what, event.total), event.what
        self.bar.total = event.total
        self.bar.update(event.done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
