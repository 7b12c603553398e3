"""The web app's API (gradio_client) and how it is served: answers, uploads, errors, binding."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.resources import stop_process
from tests.ui_helpers import (
    EXPECTED,
    QUESTION,
    REPO,
    ScriptedEngine,
    bad_files,
    free_port,
    listening_addresses,
    real_settings,
    serving,
    small_model,
    small_pdf,
    wait_until,
)

if TYPE_CHECKING:
    from gradio_client import Client

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def scripted(tmp_path: Path) -> Iterator[tuple[ScriptedEngine, str]]:
    from ui.blocks import build_app

    engine = ScriptedEngine(tmp_path / "home", max_files_per_upload=5)
    with serving(build_app(engine), engine.settings) as url:
        yield engine, url


def client(url: str) -> Client:
    from gradio_client import Client

    return Client(url, verbose=False)


def test_ask_returns_answer_stats_and_sources(scripted: tuple[ScriptedEngine, str]) -> None:
    engine, url = scripted
    answer, stats, sources = client(url).predict("What version?", "sd", 12, api_name="/ask")
    assert answer == "".join(ScriptedEngine.ANSWER)
    assert stats["method"] == "sd"
    assert stats["generated"] == 6 and stats["drafted"] == 9 and stats["accepted"] == 3
    assert stats["acceptance_rate"] == pytest.approx(1 / 3)
    assert stats["decode_tokens_per_s"] == pytest.approx(5 / 0.75)  # the first token belongs to the prefill
    assert stats["accepted_lengths"] == [2, 2, 2]
    assert stats["speedup_vs_lc"] is None and "no LC run" in stats["speedup_basis"]
    assert sources == [{"document": "manual.pdf", "page": 2, "section": None,
                        "excerpt": "This manual is for R, version 4.2.2 <b>Patched</b>", "score": 0.5,
                        "read_by_target": True}]
    assert stats["read"] is None  # the corpus fits the target's window: it read all of it
    question, decoding, compare = engine.questions[-1]
    assert (question, decoding.method, decoding.max_new_tokens, compare) == ("What version?", "sd", 12, False)


def test_ask_defaults_come_from_settings(scripted: tuple[ScriptedEngine, str]) -> None:
    engine, url = scripted
    client(url).predict("What version?", api_name="/ask")
    _, decoding, _ = engine.questions[-1]
    assert decoding == engine.settings.decoding


def test_ask_errors_are_messages_without_internals(scripted: tuple[ScriptedEngine, str]) -> None:
    from gradio_client.exceptions import AppError

    _, url = scripted
    api = client(url)
    with pytest.raises(AppError, match="The question is empty"):
        api.predict("   ", api_name="/ask")
    with pytest.raises(AppError) as unexpected:
        api.predict("boom", api_name="/ask")
    assert "server" in str(unexpected.value) and "log" in str(unexpected.value)
    assert "secret internal detail" not in str(unexpected.value) and "Traceback" not in str(unexpected.value)
    with pytest.raises(AppError, match="unknown method"):
        api.predict("What version?", "fastest", 12, api_name="/ask")


def test_upload_reports_each_file_and_keeps_the_index(scripted: tuple[ScriptedEngine, str], tmp_path: Path) -> None:
    from gradio_client import handle_file

    engine, url = scripted
    good = tmp_path / "notes.txt"
    good.write_text("The manual is for R version 4.2.2.\n")
    bad = bad_files(tmp_path / "bad")
    result = client(url).predict([handle_file(str(p)) for p in (good, bad["corrupt"], bad["exe"], bad["empty"])],
                                 api_name="/upload")
    by_file = {line["file"]: line for line in result["files"]}
    assert by_file["notes.txt"]["status"] == "added"
    assert by_file["corrupt.pdf"]["status"] == "error" and "damaged" in by_file["corrupt.pdf"]["message"]
    assert by_file["setup.exe"]["status"] == "error"
    assert "unsupported file type '.exe'" in by_file["setup.exe"]["message"]
    assert by_file["empty.txt"]["status"] == "error" and "empty" in by_file["empty.txt"]["message"]
    assert [d["document"] for d in result["documents"]] == ["notes.txt"]
    # Only the good file is kept, under its own name, inside the uploads folder.
    assert sorted(p.name for p in engine.settings.uploads_dir.iterdir()) == ["notes.txt"]

    again = client(url).predict([handle_file(str(good))], api_name="/upload")
    assert again["files"] == [{"file": "notes.txt", "status": "unchanged", "message": "already indexed"}]


def test_upload_over_the_file_count_limit_indexes_nothing(scripted: tuple[ScriptedEngine, str],
                                                          tmp_path: Path) -> None:
    from gradio_client import handle_file

    _, url = scripted
    paths = []
    for i in range(6):  # the scripted app allows 5 per upload
        paths.append(tmp_path / f"part{i}.txt")
        paths[-1].write_text(f"Part {i} of the notes.\n")
    result = client(url).predict([handle_file(str(p)) for p in paths], api_name="/upload")
    assert result["files"][0]["status"] == "error" and "at most 5 files" in result["files"][0]["message"]
    assert result["documents"] == []


def test_served_on_loopback_by_default(scripted: tuple[ScriptedEngine, str]) -> None:
    engine, url = scripted
    assert engine.settings.server.host == "127.0.0.1"
    assert url.startswith("http://127.0.0.1:")
    assert listening_addresses(os.getpid(), engine.settings.server.port) == {"127.0.0.1"}


def test_serve_options_default_to_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    from ui.serve import serve_parser, settings_for_serve

    monkeypatch.delenv("RAPIDQA_AUTH", raising=False)
    settings = settings_for_serve(serve_parser().parse_args([]))
    assert (settings.server.host, settings.server.auth) == ("127.0.0.1", None)

    monkeypatch.setenv("RAPIDQA_AUTH", "reader:s3cret:with-colon")
    settings = settings_for_serve(serve_parser().parse_args(["--host", "0.0.0.0", "--port", "9000", "--fast",
                                                          "--api-key", "k"]))
    assert (settings.server.host, settings.server.port) == ("0.0.0.0", 9000)
    assert settings.server.auth == ("reader", "s3cret:with-colon")
    assert settings.models.target == settings.models.drafter == "qwen2.5-coder-0.5b"

    with pytest.raises(ValueError, match="USER:PASSWORD"):
        settings_for_serve(serve_parser().parse_args(["--auth", "nopassword"]))


# --- real model ------------------------------------------------------------------------------------


@pytest.mark.real_models
def test_api_answers_about_an_uploaded_pdf(tmp_path: Path) -> None:
    from gradio_client import handle_file

    from app.events import STILL_READING
    from app.pipeline import Engine
    from ui.blocks import build_app

    model = small_model()
    # A home of its own: the documents' first read is cold, so a question can be asked during it.
    settings = real_settings(tmp_path / "home", model, free_port(), max_new_tokens=16)
    engine = Engine(settings)
    pdf = small_pdf(tmp_path / "R-data-p1-3.pdf")
    with serving(build_app(engine, tmp_path / "index"), settings) as url:
        api = client(url)
        uploaded = api.predict([handle_file(str(pdf))], api_name="/upload")
        assert uploaded["files"][0]["status"] == "added", uploaded
        # Asked while the upload's documents are read (in the background): answered from the passages.
        _, early, _ = api.predict(QUESTION, "rapid", 16, api_name="/ask")
        assert early["still_reading"] == STILL_READING and early["method"] == "rag"
        index = engine.open_index(tmp_path / "index")
        assert wait_until(lambda: engine.documents_ready(index), 600)
        answer, stats, sources = api.predict(QUESTION, "rapid", 16, api_name="/ask")
    assert EXPECTED in answer and stats["still_reading"] is None
    assert stats["method"] == "rapid" and 0 < stats["generated"] <= 16
    assert stats["decode_tokens_per_s"] > 0 and stats["drafted"] > 0
    assert 0 <= stats["acceptance_rate"] <= 1
    assert sum(stats["accepted_lengths"]) == stats["generated"]
    assert sources and all(s["document"] == pdf.name and s["page"] in (1, 2, 3) for s in sources)


@pytest.mark.real_models
def test_ask_serve_listens_on_loopback_only(tmp_path: Path) -> None:
    """The real entry point, `ask serve`, with no --host: every listening socket is 127.0.0.1."""
    model = small_model()
    port = free_port()
    env = os.environ | {"RAPIDQA_HOME": str(tmp_path / "home"), "GRADIO_ANALYTICS_ENABLED": "False",
                        "HF_HUB_OFFLINE": "1"}
    env.pop("RAPIDQA_AUTH", None)
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "cli.main", "serve", "--port", str(port), "--target", str(model),
             "--drafter", str(model)],
            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
        )
    try:
        assert wait_until(lambda: f"127.0.0.1:{port}" in log.read_text() or server.poll() is not None, 150), (
            log.read_text()[-3000:])
        assert server.poll() is None, log.read_text()[-3000:]
        assert listening_addresses(server.pid, port) == {"127.0.0.1"}
    finally:
        stop_process(server, 20)
