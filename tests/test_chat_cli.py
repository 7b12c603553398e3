"""`ask chat`: a terminal loop whose follow-ups carry the conversation; /new starts another."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.conversation import Turn
from tests.ui_helpers import ScriptedEngine


def test_chat_loop_keeps_the_conversation_until_new(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    import app.pipeline
    from app.chat import main

    engine = ScriptedEngine(tmp_path / "home")
    monkeypatch.setattr(app.pipeline, "Engine", lambda settings, log: engine)
    lines = iter(["What version?", "And its date?", "/new", "Which version?", ""])
    index = tmp_path / "index"
    index.mkdir()
    (index / "docstore.sqlite").touch()
    assert main(["--index", str(index)], read=lambda prompt: next(lines)) == 0
    answer = "".join(ScriptedEngine.ANSWER)
    assert engine.histories == [(), (Turn("What version?", answer),), ()]
    assert [q for q, _, _ in engine.questions] == ["What version?", "And its date?", "Which version?"]
    out = capsys.readouterr()
    assert out.out.count(answer) >= 3
    assert "Searched for: “And its date? (after: What version?)”" in out.err + out.out
    assert "[new conversation]" in out.err + out.out


def test_chat_ends_at_end_of_input(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import app.pipeline
    from app.chat import main

    engine = ScriptedEngine(tmp_path / "home")
    monkeypatch.setattr(app.pipeline, "Engine", lambda settings, log: engine)
    index = tmp_path / "index"
    index.mkdir()
    (index / "docstore.sqlite").touch()

    def end(prompt: str) -> str:
        raise EOFError

    assert main(["--index", str(index)], read=end) == 0 and engine.questions == []
