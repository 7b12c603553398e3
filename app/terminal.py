"""An answer streamed to the terminal (`ask`, `ask chat`): tokens as they come, then sources and statistics."""

from __future__ import annotations

import json
from collections.abc import Iterator

from app.events import Done, Event, Preparing, Sources, Status, Token
from app.options import log
from app.progress import PreparingBars
from app.report import done_record, summary_text


def show_answer(events: Iterator[Event], as_json: bool) -> Done:
    """Stream an answer to the terminal (or print its JSON record at the end); returns its Done."""
    done = None
    bars = PreparingBars()
    for event in events:
        if isinstance(event, Preparing):
            bars.show(event)
            continue
        bars.close()
        if isinstance(event, Status):
            log(f"[{event.message}]")
        elif isinstance(event, Sources) and not as_json:
            if event.follow_up is not None:
                log(f"[{event.follow_up.note()}]")
            log(f"[retrieved {len(event.citations)} passages for the drafter]")
            if event.reading is not None:
                log(f"[the target will {event.reading.note()}]")
        elif isinstance(event, Token) and not as_json:
            print(event.text, end="", flush=True)
        elif isinstance(event, Done):
            done = event
    assert done is not None
    print(json.dumps(done_record(done), indent=2) if as_json else summary_text(done))
    return done
