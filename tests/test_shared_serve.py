"""Two `ask serve` processes serve one corpus: one Chroma server (`chroma run`), one index folder and
one KV folder, each process with a home of its own (so only the flags share state). A document
uploaded through one is answered through the other; both uploading one file at once keep one
copy, corrupt no file, and both answer from it (real 0.5B model as target and drafter)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.chroma_server import chroma_server
from tests.resources import real_models_dir, stop_process
from tests.ui_helpers import EXPECTED, QUESTION, REPO, free_port, small_model, small_pdf, wait_until

pytestmark = [pytest.mark.real_models, pytest.mark.timeout(900)]

FESTIVAL = ("Zorbutania holds its alpaca shearing festival every year on the fourteenth of March, "
            "in the village square of Pellwick.\n")
FESTIVAL_QUESTION = "On which day does Zorbutania hold its alpaca shearing festival?"


@contextmanager
def ask_serve(tmp_path: Path, name: str, model: Path,
              shared: list[str]) -> Iterator[tuple[subprocess.Popen, int, Path]]:
    port = free_port()
    env = os.environ | {"RAPIDQA_HOME": str(tmp_path / f"home-{name}"), "RAPIDQA_MODELS_DIR": str(real_models_dir()),
                        "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
    env.pop("RAPIDQA_AUTH", None)
    log = tmp_path / f"serve-{name}.log"
    with log.open("w") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "cli.main", "serve", "--port", str(port), "--target", str(model),
             "--drafter", str(model), "--max-new-tokens", "16", *shared],
            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
        )
    try:
        yield server, port, log
    finally:
        stop_process(server, 30)


def client(port: int) -> Any:
    from gradio_client import Client

    return Client(f"http://127.0.0.1:{port}/", verbose=False)


def started(server: subprocess.Popen, port: int, log: Path) -> None:
    assert wait_until(lambda: f"127.0.0.1:{port}" in log.read_text() or server.poll() is not None, 300), (
        log.read_text()[-3000:])
    assert server.poll() is None, log.read_text()[-3000:]


def test_two_ask_serve_processes_serve_one_corpus(tmp_path: Path) -> None:
    from gradio_client import handle_file
    from safetensors.torch import load_file

    model = small_model()
    pdf = small_pdf(tmp_path / "upload" / "R-data-p1-3.pdf")
    festival = tmp_path / "upload" / "festival.txt"
    festival.write_text(FESTIVAL)
    with ExitStack() as stack:
        url = stack.enter_context(chroma_server(tmp_path / "chroma"))
        shared = ["--chroma-url", url, "--index", str(tmp_path / "index"), "--kv-dir", str(tmp_path / "kv")]
        servers = [stack.enter_context(ask_serve(tmp_path, name, model, shared)) for name in ("a", "b")]
        for server in servers:  # both load at once
            started(*server)
        a, b = (client(port) for _, port, _ in servers)

        uploaded = a.predict([handle_file(str(pdf))], api_name="/upload")
        assert uploaded["files"][0]["status"] == "added", uploaded
        answer, _, sources = b.predict(QUESTION, "rapid", 16, api_name="/ask")
        assert EXPECTED in answer, (answer, servers[1][2].read_text()[-3000:])
        assert sources and all(s["document"] == pdf.name for s in sources)

        # Both processes take the same new file at once: one adds it, the other finds it added.
        results: dict[str, dict[str, Any]] = {}
        threads = [threading.Thread(target=lambda name=name, api=api: results.__setitem__(
            name, api.predict([handle_file(str(festival))], api_name="/upload"))) for name, api in (("a", a), ("b", b))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=300)
        statuses = sorted(result["files"][0]["status"] for result in results.values())
        assert statuses in (["added", "unchanged"], ["unchanged", "added"]), results
        for api in (a, b):
            answer, _, sources = api.predict(FESTIVAL_QUESTION, "rapid", 16, api_name="/ask")
            assert "March" in answer or "14" in answer, answer
            assert "festival.txt" in {s["document"] for s in sources}
        for result in results.values():
            assert sorted(d["document"] for d in result["documents"]) == sorted([pdf.name, "festival.txt"])
        for server, _, log in servers:
            assert server.poll() is None, log.read_text()[-3000:]
            assert "Traceback" not in log.read_text(), log.read_text()[-3000:]

    stored = list((tmp_path / "kv").rglob("*.safetensors")) + list((tmp_path / "index").rglob("*.safetensors"))
    assert stored and any("chunk_kv" in p.parts for p in stored)
    for path in stored:  # every file either process wrote is whole
        assert load_file(str(path))
