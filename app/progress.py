"""Progress of the long computations a user waits for (documents' prefill, drafter chunk KV)."""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass, field

from tqdm import tqdm

from app.eta import DepthCostFit
from app.events import Preparing


@dataclass
class Job:
    """One computation over `total` tokens; updated from the thread that computes it, read by the
    requests that wait for it. Its ETA comes from the cost of its steps at their depths (app/eta.py)."""

    what: str
    total: int
    done: int = 0
    started: float = field(default_factory=time.perf_counter)
    finished: threading.Event = field(default_factory=threading.Event)
    # Tokens already in the cache where the work starts (a prefill's depth is this + done); None
    # when its cost does not grow with its progress (passages encoded one by one).
    depth: int | None = 0
    # b / a of its tokens' cost a + b * depth as the model's shape gives it (app/eta.py); None: unknown.
    prior_ratio: float | None = None
    _fit: DepthCostFit | None = field(default=None, init=False, repr=False)
    _last: float | None = field(default=None, init=False, repr=False)  # when `done` was last reported

    def update(self, done: int, total: int) -> Preparing:
        now = time.perf_counter()
        if self._fit is None:
            self._fit = DepthCostFit(self.prior_ratio, deepens=self.depth is not None)
        if done > self.done:
            since = self._last if self._last is not None else self.started
            base = self.depth or 0
            self._fit.add(base + self.done, base + done, now - since)
        self.done, self.total, self._last = done, total, now
        return self.event()

    def event(self) -> Preparing:
        now = time.perf_counter()
        elapsed = now - self.started
        rate = self.done / elapsed if self.done and elapsed > 0 else None
        eta = None
        if self._fit is not None and self._last is not None:
            base = self.depth or 0
            left = self._fit.remaining_s(base + self.done, base + self.total)
            # Polled between steps (a request waiting for this read): the step under way has run a while.
            eta = None if left is None else max(0.0, left - (now - self._last))
        return Preparing(self.what, self.done, self.total, rate, eta)


# tqdm's own remaining time is a rate's (it assumes every token costs the same): the bar shows the
# event's ETA instead (Job.event, the one place that estimates it).
BAR_FORMAT = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}, {rate_fmt}{postfix}]"


def cli_bar(what: str, total: int) -> tqdm:
    """tqdm on stderr in tokens: done/total, tokens/s and the remaining time."""
    return tqdm(total=total, desc=what, unit="tok", unit_scale=True, file=sys.stderr, dynamic_ncols=True,
                bar_format=BAR_FORMAT)


def time_left(eta_s: float) -> str:
    """'about 3 min 53 s left'."""
    minutes, seconds = divmod(int(eta_s), 60)
    return f"about {minutes} min {seconds} s left" if minutes else f"about {seconds} s left"


def describe(event: Preparing) -> str:
    """'Reading documents: 4,096 / 20,614 tokens (20%), 71 tokens/s, about 3 min 53 s left'."""
    share = f" ({event.done / event.total:.0%})" if event.total else ""
    text = f"{event.what}: {event.done:,} / {event.total:,} tokens{share}"
    if event.tokens_per_s:
        text += f", {event.tokens_per_s:,.0f} tokens/s"
    if event.eta_s is not None:
        text += f", {time_left(event.eta_s)}"
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
        if event.eta_s is not None:
            self.bar.set_postfix_str(time_left(event.eta_s), refresh=False)
        self.bar.update(event.done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
