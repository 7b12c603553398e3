"""One request's model work in a thread of its own, holding a scheduler ticket, its events handed
to the caller as a generator.

Closing that generator (Stop in the UI, a client that hung up, Ctrl-C) cancels the ticket: the
thread leaves at its next pass (decoding/scheduler.py), so nothing keeps running for a request that
went away. A request that finds every place taken says so and waits for one.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from app.events import Event, Status
from decoding.scheduler import Cancelled, Scheduler, Ticket

Emit = Callable[[Event], None]
# (the request's ticket, where its events go) -> None; runs in the request's thread
Work = Callable[[Ticket, Emit], None]
JOIN_POLL_S = 0.5  # how often a request waiting for a place checks whether it was stopped


@dataclass(frozen=True)
class _Failure:
    error: BaseException


class _End:
    pass


def run_in_session(scheduler: Scheduler, name: str, work: Work) -> Iterator[Event]:
    """Run `work` with a ticket of its own in a new thread; yield what it emits until it ends, then
    raise what it raised. Closing the generator early cancels the work at its next pass."""
    events: queue.Queue[Event | _Failure | _End] = queue.Queue()
    stop = threading.Event()
    held: list[Ticket] = []

    def body() -> None:
        try:
            announced = False
            while not stop.is_set():
                with scheduler.session(name, timeout=JOIN_POLL_S) as ticket:
                    if ticket is None:
                        if not announced:
                            events.put(Status(f"Waiting for a place: {scheduler.max_sessions} questions "
                                              "are being answered"))
                            announced = True
                        continue
                    held.append(ticket)
                    if stop.is_set():  # stopped while it joined
                        ticket.cancel()
                    work(ticket, events.put)
                    return
        except Cancelled:
            pass
        except BaseException as error:  # handed to the caller's thread, which raises it
            events.put(_Failure(error))
        finally:
            events.put(_End())

    thread = threading.Thread(target=body, name=f"rapidqa-{name}", daemon=True)
    thread.start()
    try:
        while not isinstance(item := events.get(), _End):
            if isinstance(item, _Failure):
                thread.join()
                raise item.error
            yield item
        thread.join()  # it has left its session and only returns now: the caller sees it ended
    finally:
        stop.set()
        for ticket in held:
            ticket.cancel()


def watch(scheduler: Scheduler, name: str, work: Work, show: Emit | None = None) -> None:
    """run_in_session for a caller that only watches (ingest, background preparation)."""
    for event in run_in_session(scheduler, name, work):
        if show is not None:
            show(event)
