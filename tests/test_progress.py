"""Progress of long computations: what a waiting question sees, and how it reads."""

from __future__ import annotations

from pathlib import Path

from app.config import Settings
from app.events import Preparing
from app.pipeline import Engine
from app.progress import describe


def test_the_engine_reports_the_read_running_now(tmp_path: Path) -> None:
    engine = Engine(Settings(home=tmp_path))
    assert engine.preparing() is None
    job = engine._start_job("some prefix", "Reading documents", 2000)
    job.update(500, 2000)
    now = engine.preparing()
    assert isinstance(now, Preparing) and (now.what, now.done, now.total) == ("Reading documents", 500, 2000)
    engine._end_job("some prefix", job)
    assert engine.preparing() is None and job.finished.is_set()


def test_describe_gives_done_total_rate_and_time_left() -> None:
    text = describe(Preparing("Reading documents", 4096, 20614, 71.0, 233.0))
    assert text == "Reading documents: 4,096 / 20,614 tokens (20%), 71 tokens/s, about 3 min 53 s left"
    assert describe(Preparing("Drafter reading passages", 0, 10, None, None)) == (
        "Drafter reading passages: 0 / 10 tokens (0%)"
    )
