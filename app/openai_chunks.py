"""Engine.answer's events as the pieces of an OpenAI chat completion: answer text, notes while the
answer waits (status, the documents' prefill progress), and the final piece with our extension.

The extension (`rapidqa` in the final chunk and in the non-streamed response) holds the sources,
the per-answer statistics (the records of `ask --json`) and which part of the corpus was read.
"""

from __future__ import annotations

import contextlib
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from app.conversation import FollowUp
from app.events import Done, Event, Preparing, Progress, Sources, Status, StillReading, Token
from app.report import (
    follow_up_record,
    reading_record,
    sources_record,
    speedup_record,
    stats_record,
    still_reading_record,
)
from app.speedup import Speedup
from app.stop_text import StopText
from decoding.stats import Stats
from retrieval.types import Citation, Reading

EXTENSION = "rapidqa"  # the one field our additions travel in


@dataclass(frozen=True)
class Text:
    text: str


@dataclass(frozen=True)
class Note:
    """What the answer waits on, for a client to show (no answer text)."""

    record: dict[str, Any]


@dataclass(frozen=True)
class Final:
    finish_reason: str  # OpenAI's: "stop" (end of answer or a stop sequence) or "length"
    record: dict[str, Any]  # the extension
    usage: dict[str, int]


Piece = Text | Note | Final


@dataclass
class _Seen:
    citations: Sequence[Citation] = ()
    reading: Reading | None = None
    follow_up: FollowUp | None = None
    still_reading: bool = False  # answered from the passages while the documents are read
    stats: Stats | None = None
    speedup: Speedup | None = None


def completion(events: Iterator[Event], stops: Sequence[str] = ()) -> Generator[Piece, None, None]:
    """The pieces of one answer; nothing comes before the sources, so the first piece (or the
    error) says whether the question was accepted. Closing this closes `events` (the engine's work)."""
    scanner = StopText(stops)
    seen = _Seen()
    with contextlib.closing(events):
        for event in events:
            if isinstance(event, Sources):
                seen.citations, seen.reading, seen.follow_up = event.citations, event.reading, event.follow_up
                yield Note({"status": f"Retrieved {len(event.citations)} passages"})
            elif isinstance(event, Status) and seen.citations:
                seen.still_reading = seen.still_reading or isinstance(event, StillReading)
                yield Note({"status": event.message})
            elif isinstance(event, Preparing):
                yield Note({"progress": progress_record(event)})
            elif isinstance(event, Token):
                shown = scanner.feed(event.text)
                if shown:
                    yield Text(shown)
            elif isinstance(event, Progress):
                seen.stats, seen.speedup = event.stats, event.speedup
                if scanner.stopped:  # the pass that held the stop sequence is counted: stop the work
                    break
            elif isinstance(event, Done):
                rest = scanner.flush()
                if rest:
                    yield Text(rest)
                reason = "length" if event.stats.finish_reason == "length" else "stop"
                seen.citations, seen.reading, seen.follow_up = event.citations, event.reading, event.follow_up
                seen.still_reading = event.still_reading
                yield _final(reason, seen, event.stats, event.speedup, None)
                return
    assert seen.stats is not None and seen.speedup is not None
    yield _final("stop", seen, seen.stats, seen.speedup, "stop sequence")


def progress_record(event: Preparing) -> dict[str, Any]:
    return {"what": event.what, "done": event.done, "total": event.total,
            "tokens_per_s": event.tokens_per_s, "eta_s": event.eta_s}


def _final(reason: str, seen: _Seen, stats: Stats, speedup: Speedup, stopped_by: str | None) -> Final:
    record = {
        "sources": sources_record(seen.citations),
        "stats": stats_record(stats) | speedup_record(speedup),
        "read": reading_record(seen.reading),
        "conversation": follow_up_record(seen.follow_up),
        "still_reading": still_reading_record(seen.still_reading),
        "stopped_by": stopped_by,
    }
    usage = {"prompt_tokens": stats.context_tokens, "completion_tokens": stats.generated,
             "total_tokens": stats.context_tokens + stats.generated}
    return Final(reason, record, usage)
