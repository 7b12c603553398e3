"""question + index + settings -> a stream of events. The UI, the CLI, bench and eval all use this.

The engine is three jobs, each in its own file: the model pool and the scheduler that runs every
pass (app/models.py), the documents and what is precomputed for them (app/documents.py), and
answering (app/answering.py). Many questions are answered at once: their passes are batched.
"""

from __future__ import annotations

from collections.abc import Sequence

from app.answering import Answering
from app.conversation import Turn
from app.events import Done
from decoding.settings import DecodingSettings
from retrieval.index import HybridIndex
from retrieval.types import RetrievalSettings


class Engine(Answering):
    """Models and indexes loaded once and shared by every question (and every UI session)."""


def answer_once(engine: Engine, question: str, index: HybridIndex, decoding: DecodingSettings | None = None,
                compare: bool = False, history: Sequence[Turn] = (), retrieval: RetrievalSettings | None = None,
                style: str | None = None) -> Done:
    """Run answer() to the end and return its Done event (eval, bench and tests)."""
    done = [e for e in engine.answer(question, index, decoding, compare, retrieval, history=history, style=style)
            if isinstance(e, Done)]
    return done[-1]
