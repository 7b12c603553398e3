"""Limits the engine enforces before any model runs: each gets a clear message."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.config import Limits, Settings
from app.errors import QuestionError, user_message
from app.pipeline import Engine
from app.speedup import LcReference
from decoding.settings import DecodingSettings
from decoding.stats import Stats


@pytest.fixture
def engine(tmp_path: Path) -> Engine:
    return Engine(Settings(home=tmp_path, limits=Limits(max_question_chars=50, max_new_tokens=64)))


@pytest.mark.parametrize(
    ("question", "decoding", "message"),
    [
        ("   ", DecodingSettings(max_new_tokens=32), "The question is empty."),
        ("x" * 51, DecodingSettings(max_new_tokens=32), "The question has 51 characters; the limit is 50."),
        ("ok?", DecodingSettings(max_new_tokens=65), "max new tokens 65 is over the limit of 64."),
        ("ok?", DecodingSettings(max_new_tokens=32, gamma=0), "gamma must be between 1 and 16"),
        ("ok?", DecodingSettings(max_new_tokens=32, method="fastest"), "unknown method 'fastest'"),
        ("ok?", DecodingSettings(max_new_tokens=32, temperature=-1), "temperature must be >= 0"),
    ],
)
def test_limits_are_clear_messages(engine: Engine, question: str, decoding: DecodingSettings, message: str) -> None:
    with pytest.raises(QuestionError) as caught:
        engine.check_question(question, decoding)
    assert message in str(caught.value)
    assert user_message(caught.value) == str(caught.value)


def test_a_valid_question_passes(engine: Engine) -> None:
    engine.check_question("Which function reads fixed-width files?", DecodingSettings(max_new_tokens=64))


def test_lc_reference_is_read_once(tmp_path, monkeypatch) -> None:
    """The UI asks for a speedup at every target pass: the reference file must not be re-read each time."""
    reference = LcReference(tmp_path / "lc.json")
    reference.record("t", Stats("lc", context_tokens=4000, generated=11, decode_s=2.0))
    reads: list[Path] = []
    real_read_text = Path.read_text
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: reads.append(self) or real_read_text(self, *a, **k))
    fresh = LcReference(tmp_path / "lc.json")
    for _ in range(5):
        speedup = fresh.speedup("t", Stats("rapid", context_tokens=4000, generated=21, decode_s=2.0))
    assert speedup.value == pytest.approx(2.0)
    assert len(reads) == 1
