"""One round of bench.serve: N users start together (a barrier), each a thread timing its own answer.

A user is (question id, ask): ask(started) runs the whole answer and returns what that user saw,
timed from `started`, the user's own start after the barrier. The engine's user (engine_user)
reads Engine.answer's events; the llama.cpp server's user is in bench.serve_peer.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence

from app.pipeline import Engine
from app.reexports import DecodingSettings, HybridIndex
from bench.serve_metrics import UserResult
from bench.ttft import first_token_and_done

Ask = Callable[[float], UserResult]


def run_round(users: Sequence[tuple[str, Ask]]) -> list[UserResult]:
    """Every user's answer, started together; a user whose answer raised gets its error, the others go on."""
    barrier = threading.Barrier(len(users))
    results: list[UserResult | None] = [None] * len(users)

    def user(number: int, question_id: str, ask: Ask) -> None:
        barrier.wait()
        started = time.perf_counter()
        try:
            results[number] = ask(started)
        except Exception as error:  # reported in the round's row: one failed user must not hide the others
            results[number] = UserResult(question_id, None, None, [], started, time.perf_counter(),
                                         f"{type(error).__name__}: {error}")

    threads = [threading.Thread(target=user, args=(number, question_id, ask), name=f"user-{number}")
               for number, (question_id, ask) in enumerate(users)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return [r for r in results if r is not None]


def engine_user(engine: Engine, index: HybridIndex, question_id: str, question: str,
                decoding: DecodingSettings) -> tuple[str, Ask]:
    """A user asking through Engine.answer, the call the UI and the CLI make: time to the first
    Token event (the first answer text the user sees) and to the Done event."""

    def ask(started: float) -> UserResult:
        first, done = first_token_and_done(engine.answer(question, index, decoding), started)
        ended = time.perf_counter()
        if done is None:
            raise RuntimeError("the answer stream ended without a Done event")
        return UserResult(question_id, first, ended - started, list(done.token_ids), started, ended,
                          draft_lengths=list(done.stats.draft_lengths))

    return question_id, ask
