"""bench.serve without models or servers: its figures from made-up timings, the llama-server command
line and requests it builds, its rounds' barrier and errors, and its question choice."""

from __future__ import annotations

import re
import sys
import threading
import time
from pathlib import Path

import pytest

from bench.serve import DOCUMENT, QUESTIONS, document_questions, main, user_counts
from bench.serve_metrics import UserResult, aggregate_tokens_per_s, markdown_table, percentile, round_row
from bench.serve_peer import PeerMissing, completion_request, find_llama_server, peer_rows, server_command
from bench.serve_round import Ask, run_round

REPO = Path(__file__).resolve().parent.parent


def user(question: str, first: float | None, seconds: float | None, tokens: list[int], started: float = 100.0,
         error: str | None = None) -> UserResult:
    return UserResult(question, first, seconds, tokens, started, started + (seconds or 0.5), error)


def test_percentiles_interpolate_between_ranks() -> None:
    assert percentile([3.0, 1.0, 2.0, 4.0], 50) == 2.5
    assert percentile([1.0, 2.0, 3.0, 4.0], 95) == pytest.approx(3.85)
    assert percentile([float(v) for v in range(1, 21)], 95) == pytest.approx(19.05)
    assert percentile([7.0], 95) == 7.0 and percentile([7.0], 50) == 7.0
    assert percentile([], 50) is None
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_aggregate_throughput_is_all_tokens_over_the_rounds_wall_time() -> None:
    # Starts 0.5 s apart; the round runs from the first start to the last end: 100.0 .. 104.0.
    users = [user("a", 0.5, 2.0, [1] * 10, started=100.0), user("b", 1.0, 3.5, [1] * 30, started=100.5)]
    assert aggregate_tokens_per_s(users) == pytest.approx(40 / 4.0)
    assert aggregate_tokens_per_s([]) is None


def test_round_row_compares_with_the_solo_answers() -> None:
    solo = {"a": user("a", 0.2, 1.0, [1, 2, 3]), "b": user("b", 0.3, 2.0, [4, 5]), "c": user("c", 0.1, 3.0, [6])}
    users = [user("a", 0.5, 2.0, [1, 2, 3]), user("b", 1.5, 4.0, [4, 9]), user("c", 1.0, 6.0, [6])]
    row = round_row("rapidqa lc", users, solo, 3.25)
    assert row["users"] == 3 and row["answered"] == 3 and row["errors"] == []
    assert row["answer_tokens"] == 6 and row["wall_s"] == pytest.approx(6.0)
    assert row["aggregate_tokens_per_s"] == pytest.approx(1.0)
    assert row["first_token_p50_s"] == 1.0 and row["first_token_p95_s"] == pytest.approx(1.45)
    assert row["answer_p50_s"] == 4.0 and row["answer_p95_s"] == pytest.approx(5.8)
    assert row["solo_answer_p50_s"] == 2.0 and row["answer_p50_over_solo"] == pytest.approx(2.0)
    assert row["same_tokens_as_solo"] == "2/3"  # b's second token differs from its solo answer
    assert row["peak_rss_gb"] == 3.25
    assert [u["solo_answer_s"] for u in row["per_user"]] == [1.0, 2.0, 3.0]


def test_a_failed_user_is_counted_and_voids_the_throughput() -> None:
    users = [user("a", 0.5, 2.0, [1, 2]), user("b", None, None, [], error="RuntimeError: boom")]
    row = round_row("llama.cpp server", users, {"a": user("a", 0.4, 1.0, [1, 2])}, None)
    assert row["answered"] == 1 and row["errors"] == ["RuntimeError: boom"]
    assert row["aggregate_tokens_per_s"] is None  # a lost answer must not read as a throughput
    assert row["same_tokens_as_solo"] == "1/2"
    table = markdown_table([row])
    assert "llama.cpp server (1 failed)" in table


def test_markdown_table_has_a_header_and_formats_each_figure() -> None:
    solo = {"a": user("a", 0.25, 2.0, [1])}
    row = round_row("rapidqa rapid", [user("a", 0.25, 2.0, [1, 2, 3, 4])], solo, None)
    lines = markdown_table([row]).splitlines()
    assert len(lines) == 3
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    cells = dict(zip(header, (cell.strip() for cell in lines[2].strip("|").split("|")), strict=True))
    assert lines[1].count("|") == len(header) + 1
    assert cells["engine"] == "rapidqa rapid" and cells["users"] == "1"
    assert cells["answer tok/s (all users)"] == "2.00"  # 4 tokens over 2 s
    assert cells["TTFT p50 s"] == "0.25" and cells["answer p95 s"] == "2.00"
    assert cells["p50 / alone"] == "1.00x" and cells["= alone"] == "0/1"
    assert cells["peak RSS GB"] == "-"


def test_llama_server_command_line() -> None:
    command = server_command(Path("/peers/bin/llama-server"), Path("/m/model.gguf"), slots=4, prompt_tokens=20700,
                             new_tokens=128, threads=2, port=8123, slot_files=Path("/tmp/slots"),
                             extra=["--cache-ram", "0"])
    text = " ".join(command)
    assert command[0] == "/peers/bin/llama-server"
    assert re.search(r"-m /m/model.gguf\b", text)
    assert re.search(r"-np 4\b", text)
    assert re.search(rf"-c {4 * (20700 + 128)}\b", text)  # every slot holds one whole prompt and answer
    assert "--cont-batching" in command
    assert re.search(r"-t 2 -tb 2\b", text)
    assert re.search(r"--temp 0\b", text) and re.search(r"-n 128\b", text)
    assert re.search(r"--host 127.0.0.1 --port 8123\b", text)
    assert re.search(r"--slot-save-path /tmp/slots\b", text)  # the prefix is read once, restored per slot
    assert command[-2:] == ["--cache-ram", "0"]


def test_completion_requests_send_our_tokens_greedy_to_a_slot() -> None:
    warm = completion_request([1, 2, 3], 1, 2, stream=False)
    assert warm == {"prompt": [1, 2, 3], "n_predict": 1, "temperature": 0, "cache_prompt": True, "id_slot": 2,
                    "stream": False, "return_tokens": True}
    timed = completion_request([1, 2, 3, 4], 128, 0, stream=True)
    assert timed["stream"] is True and timed["n_predict"] == 128 and timed["prompt"] == [1, 2, 3, 4]


def test_a_missing_llama_server_says_make_peers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("RAPIDQA_LLAMA_CPP_BIN", str(tmp_path))
    with pytest.raises(PeerMissing, match="make peers"):
        find_llama_server(tmp_path)
    # The run stops before loading anything, with the message, not a silent skip of the peer row.
    assert main(["--users", "1", "--methods", "lc"]) == 1
    assert "make peers" in capsys.readouterr().err
    (tmp_path / "llama-server").touch()
    assert find_llama_server(tmp_path) == tmp_path / "llama-server"


def test_makefile_builds_llama_server() -> None:
    makefile = (REPO / "Makefile").read_text()
    targets = re.search(r"cmake --build .*--target ([^&]+)&&", makefile)
    assert targets is not None and "llama-server" in targets.group(1).split()


def test_users_start_together_and_a_failure_stays_with_its_user() -> None:
    arrived: list[float] = []
    lock = threading.Lock()

    def ask(name: str, fail: bool, delay: float) -> tuple[str, Ask]:
        def run(started: float) -> UserResult:
            with lock:
                arrived.append(started)
            time.sleep(delay)
            if fail:
                raise RuntimeError("the server went away")
            return UserResult(name, 0.01, time.perf_counter() - started, [1], started, time.perf_counter())
        return name, run

    results = run_round([ask("a", False, 0.05), ask("b", True, 0.0), ask("c", False, 0.1)])
    assert [r.question_id for r in results] == ["a", "b", "c"]
    assert results[1].error == "RuntimeError: the server went away" and results[1].answer_s is None
    assert results[0].error is None and results[2].answer_s >= 0.1
    assert max(arrived) - min(arrived) < 0.05  # released by one barrier, not one after another


def test_each_user_gets_a_different_question_spread_over_the_file() -> None:
    items = document_questions(QUESTIONS, DOCUMENT, 4)
    assert len({item.id for item in items}) == 4
    assert items[0].id == "rdata-01" and items[-1].id != "rdata-04"  # spread, not the first four
    from app.errors import CliError

    with pytest.raises(CliError, match="different questions"):
        document_questions(QUESTIONS, DOCUMENT, 1000)
    with pytest.raises(CliError, match="--users"):
        user_counts("1,0")


FAKE_SERVER = '''#!{python}
"""A llama-server stand-in: healthy, then it drops every /completion connection (a crash mid-answer)."""
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.end_headers()

    def do_POST(self):
        self.connection.close()

    def log_message(self, *args):
        pass


HTTPServer(("127.0.0.1", int(sys.argv[sys.argv.index("--port") + 1])), Handler).serve_forever()
'''


@pytest.mark.parametrize("script", ["#!/bin/sh\necho 'error: cannot load the model'\nexit 3\n", FAKE_SERVER])
def test_a_failing_server_is_a_runtime_error_bench_serve_reports(tmp_path: Path, script: str) -> None:
    """bench.serve keeps its own rows and records the peer's error when the server dies, at start or
    mid-answer (a dropped connection must not escape as a traceback)."""
    binary = tmp_path / "llama-server"
    binary.write_text(script.replace("{python}", sys.executable))
    binary.chmod(0o755)
    with pytest.raises(RuntimeError, match=r"exited|RemoteDisconnected|ConnectionResetError"):
        peer_rows(binary, tmp_path / "model.gguf", [("q1", [1, 2, 3])], [1, 2], [1], 4, 1, [], lambda _: None)


STREAMING_SERVER = '''#!{python}
"""A llama-server stand-in that streams three tokens, the last one the end of the answer."""
import json
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.end_headers()

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.send_response(200)
        self.end_headers()
        final = {"stop": True, "tokens": [], "tokens_evaluated": len(body["prompt"]), "stop_type": "eos"}
        chunks = [{"tokens": [5]}, {"tokens": [6]}, {"tokens": [151645]}, final] if body["stream"] else [final]
        for chunk in chunks:
            self.wfile.write(("data: " if body["stream"] else "").encode() + json.dumps(chunk).encode() + b"\\n\\n")

    def log_message(self, *args):
        pass


HTTPServer(("127.0.0.1", int(sys.argv[sys.argv.index("--port") + 1])), Handler).serve_forever()
'''


def test_the_peers_answer_tokens_leave_out_the_end_token_as_ours_do(tmp_path: Path) -> None:
    """llama-server streams the end-of-answer token; Engine.answer's token_ids never hold it, so the
    peer's answer length (and its throughput) would count one token more per answer."""
    binary = tmp_path / "llama-server"
    binary.write_text(STREAMING_SERVER.replace("{python}", sys.executable))
    binary.chmod(0o755)
    rows, _ = peer_rows(binary, tmp_path / "model.gguf", [("q1", [1, 2, 3])], [1, 2], [1], 4, 1, [], lambda _: None)
    assert rows[0]["answer_tokens"] == 2 and rows[0]["per_user"][0]["tokens"] == 2
    assert rows[0]["same_tokens_as_solo"] == "1/1"
