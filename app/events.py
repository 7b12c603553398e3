"""What pipeline.answer yields, in order: Status*, Sources, (Status | Preparing)*, (Token | Progress)*, Done."""

from __future__ import annotations

from dataclasses import dataclass, field

from app.conversation import FollowUp
from app.speedup import Speedup
from decoding.stats import Stats
from retrieval.types import Citation, Reading

# The label of an answer given while its documents' first read runs (app/answering.py).
STILL_READING = "the documents are still being read: answered from the retrieved passages"


@dataclass(frozen=True)
class Status:
    """A stage the user is waiting on (retrieving, prefilling N tokens, ...)."""

    message: str


@dataclass(frozen=True)
class StillReading(Status):
    """The documents' first read is still running: this answer comes from the retrieved passages."""

    message: str = f"{STILL_READING[0].upper()}{STILL_READING[1:]}"


@dataclass(frozen=True)
class Preparing:
    """Progress of a long computation the question waits for (the documents' prefill, chunk KV)."""

    what: str
    done: int  # tokens
    total: int
    tokens_per_s: float | None
    eta_s: float | None


@dataclass(frozen=True)
class Sources:
    citations: list[Citation]
    reading: Reading | None = None  # which part of a corpus larger than the target's window it reads
    follow_up: FollowUp | None = None  # how a question continuing a conversation was read


@dataclass(frozen=True)
class Token:
    """A piece of answer text, emitted as soon as the target has accepted it."""

    text: str


@dataclass(frozen=True)
class Progress:
    """Live statistics after a target pass."""

    stats: Stats
    speedup: Speedup


@dataclass(frozen=True)
class Done:
    answer: str
    stats: Stats
    citations: list[Citation]
    speedup: Speedup
    lc_stats: Stats | None = None  # the LC run of a side-by-side comparison
    reading: Reading | None = None  # which part of a corpus larger than the target's window it read
    token_ids: list[int] = field(default_factory=list)  # the answer's tokens (eval compares them with LC's)
    # The prompts this answer was computed from: the target's long prompt and the RAG prompt (bench
    # runs its peers on exactly these tokens).
    long_prompt_tokens: list[int] = field(default_factory=list)
    rag_prompt_tokens: list[int] = field(default_factory=list)
    follow_up: FollowUp | None = None  # how a question continuing a conversation was read
    # Answered from the retrieved passages alone because the documents' first read was still running
    # (STILL_READING says so to people); asking again once it is done reads the full documents.
    still_reading: bool = False


Event = Status | Preparing | Sources | Token | Progress | Done
