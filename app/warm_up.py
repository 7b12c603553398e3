"""What a question will need before its first token and before its drafter's first draft, prepared
in a thread of its own while the process does its other start-up work.

A one-question process (`ask "..."`) otherwise does it all one after the other, most of it on the
answer's path: it loads the target and opens the index, then, answering, loads the embedder (at the
first retrieval) and the drafter, computes each model's identity for the prefix cache and chunk KV
(a pass over a probe) and each tokenizer's vocabulary key (drafter and target must share one). None
of it depends on the question, so it starts at once, beside the target's load. The answer's path
asks for the same things as before and finds them ready, or waits for the one being loaded (never
loading it twice: app/models.py, the embedder's lock).
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
    jobs = [("embedder", engine.embedder.load), ("target", lambda: prepare_target(engine))]
    info = method_info(method)
    if info.drafts_with_model and not info.drafter_is_target:
        jobs.append(("drafter", lambda: prepare_drafter(engine, method)))
    threads = [threading.Thread(target=_logged(engine, job), name=f"rapidqa-warm-up-{name}", daemon=False)
               for name, job in jobs]
    for thread in threads:
        thread.start()
    return threads


def prepare_target(engine: Documents) -> None:
    """The target's model key (the prefix cache's lookup computes it otherwise: a pass over a probe),
    as soon as the caller's thread has loaded the target."""
    engine.prefix_cache.model_key(engine.target.model)


def prepare_drafter(engine: Documents, method: str) -> None:
    """The drafter's load, beside the target's; then its model key (a chunk KV store's name) and both
    vocabulary keys (generate.check_same_vocabulary's)."""
    drafter = engine.model(engine.drafter_spec(method))
    engine.prefix_cache.model_key(drafter.model)
    _ = drafter.vocabulary_key, engine.target.vocabulary_key


def _logged(engine: Documents, job: Callable[[], None]) -> Callable[[], None]:
    def run() -> None:
        try:
            job()
        except Exception as error:  # the answer's path does the same work itself and reports it there
            engine.log(f"preparing ahead failed: {type(error).__name__}: {error}")

    return run
