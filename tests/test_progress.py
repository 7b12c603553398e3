"""Progress of long computations: what a waiting question sees, and how it reads."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from app.config import Settings
from app.events import Preparing, Status
from app.pipeline import Engine
from app.progress import Job, describe, run_with_progress


def test_a_question_waiting_for_the_engine_sees_the_running_job(tmp_path: Path) -> None:
    engine = Engine(Settings(home=tmp_path))
    started, release = threading.Event(), threading.Event()

    def job() -> None:
        with engine._generate_lock, engine._track("Reading documents", bar=False) as tracked:
            tracked.update(500, 2000)
            started.set()
            release.wait(10)

    worker = threading.Thread(target=job)
    worker.start()
    started.wait(10)
    waiting = engine._wait_for_engine()
    first = next(waiting)
    assert isinstance(first, Preparing) and (first.what, first.done, first.total) == ("Reading documents", 500, 2000)
    assert engine.preparing() is not None
    release.set()
    rest = list(waiting)  # ends once the lock is taken
    assert all(isinstance(e, Preparing | Status) for e in rest)
    assert engine._generate_lock.locked()
    engine._generate_lock.release()
    worker.join()
    assert engine.preparing() is None


def test_run_with_progress_reports_then_reraises() -> None:
    job = Job("Reading documents", 100)

    def work() -> None:
        for done in range(0, 101, 25):
            job.update(done, 100)
            time.sleep(0.05)

    events = list(run_with_progress(work, lambda: job, poll_s=0.02))
    assert events and events[-1].done <= 100 and events[0].total == 100

    def failing() -> None:
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        list(run_with_progress(failing, lambda: None, poll_s=0.01))


def test_describe_gives_done_total_rate_and_time_left() -> None:
    text = describe(Preparing("Reading documents", 4096, 20614, 71.0, 233.0))
    assert text == "Reading documents: 4,096 / 20,614 tokens (20%), 71 tokens/s, about 3 min 53 s left"
    assert describe(Preparing("Drafter reading passages", 0, 10, None, None)) == (
        "Drafter reading passages: 0 / 10 tokens (0%)"
    )
