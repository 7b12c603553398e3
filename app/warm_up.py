"""What a question will need before its first token, prepared in threads of their own while the
process does its other start-up work.

A one-question process (`ask "..."`) otherwise does it all one after the other: it loads the target
and opens the index, then, answering, loads the embedder (at the first retrieval) and the drafter,
and computes the drafter's identity for its chunk KV store (a pass over a probe). None of it
depends on the question, so it starts at once, beside the target's load. The answer's path asks
for the same things as before and finds them ready, or waits for the one being loaded (never
loading it twice: app/models.py, the embedder's lock).

Only loads and that one small pass: work that would run beside the answer's own passes and
retrieval (the target's identity, the vocabulary keys) stays where it was, as two threads' compute
on a few cores only slows both. What the drafter needs after the first token is built aside by then
(decoding/generate.py DrafterBuild).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from app.documents import Documents
from decoding.methods import method_info


def start_warm_up(engine: Documents, method: str) -> list[threading.Thread]:
    """Start preparing what a question with `method` needs besides the target's load (the caller's
    thread loads the target while opening the index); returns the threads. Not daemons: a process
    that ends early (a bad question) waits for them rather than tear torch down under a pass."""
    # Each job reaches what it loads in its own thread: a failure there is the answer's to report.
    jobs: list[tuple[str, Callable[[], None]]] = [("embedder", lambda: engine.embedder.load())]
    info = method_info(method)
    if info.drafts_with_model and not info.drafter_is_target:
        jobs.append(("drafter", lambda: prepare_drafter(engine, method)))
    threads = [threading.Thread(target=_logged(engine, job), name=f"rapidqa-warm-up-{name}", daemon=False)
               for name, job in jobs]
    for thread in threads:
        thread.start()
    return threads


def prepare_drafter(engine: Documents, method: str) -> None:
    """The drafter's load, beside the target's; then its model key (the name of its chunk KV store,
    which the answer opens before its first token)."""
    engine.prefix_cache.model_key(engine.model(engine.drafter_spec(method)).model)


def _logged(engine: Documents, job: Callable[[], None]) -> Callable[[], None]:
    def run() -> None:
        try:
            job()
        except Exception as error:  # the answer's path does the same work itself and reports it there
            engine.log(f"preparing ahead failed: {type(error).__name__}: {error}")

    return run
