"""Many sessions, one pass at a time: every session's model passes run in shared batches.

Each question decodes in a thread of its own, written as if it were alone (decoding/generate.py);
its passes go through its Ticket, which hands them to the scheduler and waits. The scheduler's
thread runs a pass once every active session waits on one (or after a short patience, so that a
session busy elsewhere holds no one up), over the rows of every waiting session at once
(Transformer.forward_many). A row's logits do not depend on the other rows of its pass, so each
session gets exactly the tokens it would get alone, whatever the batch.

Drafting passes run first: while a RAPID session drafts, the sessions waiting with a target pass
(an LC step, a verify block, a prefill chunk) wait for it, and the next target pass then takes every
session's rows together - the weights are read once for all of them. Long work (a document's
prefill) comes in chunks of rows, so another session's stream waits at most about one chunk.

A document read for later questions (Ticket.in_background) yields to everyone else: its passes are
never batched with the others' and run only when no other session waits on a pass - and, while
other sessions are active but busy between passes, only after a longer patience, since their next
pass usually comes within milliseconds and a read's chunk takes seconds. A question asked during a
read so pays no chunk per pass. A read never waits more than the longest wait behind them, so a
steady stream of questions slows it but never stops it.

A session stopped by its user (Ticket.cancel) leaves at its next pass: the pass it waits on is
dropped and Cancelled is raised in its thread, so nothing keeps running for it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from decoding.pass_costs import Others, PassCosts, best_draft_length
from decoding.transformer import Rows, Transformer

# How long a background pass waits while other sessions are active but none waits on a pass: longer
# than a session's gap between passes (sampling, a draft's bookkeeping), far shorter than a read.
BACKGROUND_PATIENCE_S = 0.25
# The longest a background pass waits while other sessions' passes keep coming.
BACKGROUND_LONGEST_WAIT_S = 60.0


class Cancelled(Exception):
    """The session was stopped: raised in its thread at its next pass."""


@dataclass
class _Request:
    ticket: Ticket
    model: Transformer
    rows: Rows
    background: bool  # a pass of a read for later questions (Ticket.in_background)
    arrived: float = field(default_factory=time.perf_counter)
    done: threading.Event = field(default_factory=threading.Event)
    result: torch.Tensor | None = None
    error: BaseException | None = None


class Ticket:
    """One session's place at the scheduler: its passes (`run`, a decoding.transformer.Run), its
    draft lengths, and its cancellation."""

    def __init__(self, scheduler: Scheduler, name: str) -> None:
        self.scheduler = scheduler
        self.name = name
        self.cancelled = threading.Event()
        self.elsewhere = False  # waiting on something other than a pass (see idle)
        self.drafts = False  # it has planned a draft (a session that drafts, not plain decoding)
        self.background = False  # its passes read documents for later questions (see in_background)

    def run(self, model: Transformer, rows: Rows) -> torch.Tensor:
        return self.scheduler.submit(self, model, rows)

    @contextmanager
    def idle(self) -> Iterator[None]:
        """While the session waits on something other than a pass (another request reading the
        documents it needs), no pass waits for it."""
        self.elsewhere = True
        self.scheduler.wake()
        try:
            yield
        finally:
            self.elsewhere = False

    @contextmanager
    def in_background(self) -> Iterator[None]:
        """While the session reads documents for later questions (a window's first read), its passes
        wait for every other session's and never share a pass with them (see the module docstring)."""
        self.background = True
        self.scheduler.wake()
        try:
            yield
        finally:
            self.background = False
            self.scheduler.wake()

    def cancel(self) -> None:
        self.cancelled.set()
        self.scheduler.wake()

    def draft_length(self, model: Transformer, drafter: Transformer | None, longest: int, acceptance: float) -> int:
        """How many tokens to draft before the next verify (0: a plain step), from the measured cost
        of passes at the current batch and this session's acceptance so far. At eta = 0 every choice
        gives the same tokens: this only decides how fast they come."""
        self.drafts = True
        return best_draft_length(self.scheduler.costs, model, drafter, longest, acceptance, self.scheduler.others(self))


class Scheduler:
    def __init__(self, max_sessions: int = 8, patience_s: float = 0.02,
                 background_patience_s: float = BACKGROUND_PATIENCE_S,
                 background_longest_wait_s: float = BACKGROUND_LONGEST_WAIT_S) -> None:
        """max_sessions: sessions decoding at once (a pass's batch); more wait at join().
        patience_s: how long a waiting pass waits for sessions busy between passes.
        background_patience_s, background_longest_wait_s: a background pass's waits (module docstring)."""
        self.max_sessions = max_sessions
        self.patience_s = patience_s
        self.background_patience_s = background_patience_s
        self.background_longest_wait_s = background_longest_wait_s
        self.costs = PassCosts()
        self._slots = threading.Semaphore(max_sessions)
        self._lock = threading.Condition()
        self._active: set[Ticket] = set()
        self._pending: list[_Request] = []
        self._worker: threading.Thread | None = None
        self.passes = 0  # passes run (tests and benchmarks read it)
        self.largest_batch = 0  # the most sessions one pass has served
        self.shared_passes = 0  # passes that served more than one session
        self._free_since = 0.0  # when the last pass ended

    # ------------------------------------------------------------------ sessions

    @contextmanager
    def session(self, name: str = "", timeout: float | None = None) -> Iterator[Ticket | None]:
        """A ticket for the duration of the block; None when no place freed up within `timeout`
        (the caller shows that it waits and asks again)."""
        if not self._slots.acquire(timeout=timeout):
            yield None
            return
        ticket = Ticket(self, name)
        with self._lock:
            self._active.add(ticket)
            self._start_worker()
        try:
            yield ticket
        finally:
            with self._lock:
                self._active.discard(ticket)
                self._pending = [r for r in self._pending if r.ticket is not ticket]
                self._lock.notify_all()
            self._slots.release()

    def active_sessions(self) -> int:
        with self._lock:
            return len(self._active)

    def others(self, ticket: Ticket) -> Others:
        with self._lock:
            # A background session never shares a pass with this one.
            others = [t for t in self._active if t is not ticket and not t.elsewhere and not t.background]
        return Others(len(others), sum(1 for t in others if t.drafts))

    def wake(self) -> None:
        with self._lock:
            self._lock.notify_all()

    # ------------------------------------------------------------------ passes

    def submit(self, ticket: Ticket, model: Transformer, rows: Rows) -> torch.Tensor:
        """Queue a pass of the ticket's session and wait for its logits (called in its thread)."""
        if ticket.cancelled.is_set():
            raise Cancelled
        request = _Request(ticket, model, rows, ticket.background)
        with self._lock:
            if ticket not in self._active:
                raise RuntimeError("a pass from a session that has left the scheduler")
            self._pending.append(request)
            self._lock.notify_all()
        request.done.wait()  # a cancelled session's pass is dropped by the scheduler with Cancelled
        if request.error is not None:
            raise request.error
        assert request.result is not None
        return request.result

    def _start_worker(self) -> None:
        if self._worker is None or not self._worker.is_alive():
            # Not a daemon: it leaves as soon as no session is left, and the interpreter waits for
            # that, so torch is never torn down under a pass or this thread's own exit (an abort,
            # "terminate called without an active exception", at the end of `ask`).
            self._worker = threading.Thread(target=self._serve, name="rapidqa-scheduler", daemon=False)
            self._worker.start()

    def _serve(self) -> None:
        while True:
            with self._lock:
                batch = self._next_batch()
                if batch is None:
                    return  # no session left: the thread ends (a new session starts another)
            self._run(batch)

    def _next_batch(self) -> list[_Request] | None:
        """Wait (holding the lock) until a pass should run; the requests it serves, removed from the
        queue. None when no session is active."""
        while True:
            if not threading.main_thread().is_alive():  # the program is ending: no one reads these sessions
                for ticket in self._active:
                    ticket.cancelled.set()
            self._drop_cancelled()
            if not self._pending and (not self._active or not threading.main_thread().is_alive()):
                self._worker = None
                return None
            if self._pending:
                batch, wait_s = self._ready()
                if batch is not None:
                    return batch
                self._lock.wait(wait_s)
            else:
                self._lock.wait(1.0)

    def _ready(self) -> tuple[list[_Request] | None, float]:
        """The requests a pass should serve now, or None and how long to wait before asking again.

        Foreground passes first, with the usual patience for foreground sessions busy between passes.
        Background passes when none is waiting: with that same patience among themselves when no
        foreground session is active, the longer background patience when one is (it is about to
        send a pass), and at once when one has waited the longest wait."""
        foreground = [r for r in self._pending if not r.background]
        background = [r for r in self._pending if r.background]
        now = time.perf_counter()
        longest_left = float("inf")
        if background:
            longest_left = min(r.arrived for r in background) + self.background_longest_wait_s - now
            if longest_left <= 0:
                return self._take(background), 0.0
        busy = [t for t in self._active if not t.elsewhere and not t.cancelled.is_set()]
        foreground_sessions = [t for t in busy if not t.background]
        if foreground:
            left = self._patience_left(foreground, foreground_sessions, self.patience_s, now)
            return (self._take(foreground), 0.0) if left <= 0 else (None, min(left, longest_left))
        if foreground_sessions:
            left = self._patience_left(background, foreground_sessions, self.background_patience_s, now)
        else:
            left = self._patience_left(background, busy, self.patience_s, now)
        return (self._take(background), 0.0) if left <= 0 else (None, min(left, longest_left))

    def _patience_left(self, requests: list[_Request], sessions: list[Ticket], patience_s: float,
                       now: float) -> float:
        """How long these requests still wait for the sessions that may add to their pass (<= 0: run
        now). Patience counts from when a pass could first run: a request that arrived during the
        last pass must not leave the sessions of that pass behind (they alternate then)."""
        waiting = {r.ticket for r in requests}
        if all(t in waiting for t in sessions):
            return 0.0
        since = max(min(r.arrived for r in requests), self._free_since)
        return patience_s - (now - since)

    def _drop_cancelled(self) -> None:
        """Passes of stopped sessions never run: their threads get Cancelled instead."""
        for request in [r for r in self._pending if r.ticket.cancelled.is_set()]:
            self._pending.remove(request)
            request.error = Cancelled()
            request.done.set()

    def _take(self, requests: list[_Request]) -> list[_Request]:
        """Of these requests (all foreground or all background), drafting passes first; then the model
        with the most waiting rows, all of its requests."""
        drafting = [r for r in requests if r.rows.drafting]
        candidates = drafting or requests
        by_model: dict[int, list[_Request]] = {}
        for request in candidates:
            by_model.setdefault(id(request.model), []).append(request)
        batch = max(by_model.values(), key=lambda group: (len(group), -min(r.arrived for r in group)))
        taken = set(map(id, batch))
        self._pending = [r for r in self._pending if id(r) not in taken]
        return batch

    def _run(self, batch: list[_Request]) -> None:
        model = batch[0].model
        started = time.perf_counter()
        try:
            with torch.inference_mode():
                results = model.forward_many([r.rows for r in batch])
        except BaseException as error:  # handed to every session of the pass, in its own thread
            self._free_since = time.perf_counter()
            for request in batch:
                request.error = error
                request.done.set()
            return
        rows = sum(r.rows.tokens.shape[0] for r in batch)
        self._free_since = time.perf_counter()
        self.costs.record(model, rows, self._free_since - started)
        self.passes += 1
        self.largest_batch = max(self.largest_batch, len(batch))
        self.shared_passes += len(batch) > 1
        for request, result in zip(batch, results, strict=True):
            request.result = result
            request.done.set()
