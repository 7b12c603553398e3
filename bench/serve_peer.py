"""The llama.cpp server as bench.serve's peer row: `llama-server -np N` with continuous batching, on the
GGUF file our target was converted from, reading our LC's prompt tokens.

Per round a fresh server with N slots (-c N x (prompt + answer): each slot holds one whole answer),
each slot first given the document prefix (cache_prompt, one token predicted), then the N users
send their questions at once as streamed /completion requests, so time to first token is seen by
the client. Slot 0 prefills the prefix and saves it (llama.cpp's slot save; a saved slot loads
only into a server with the same slot count), and every other slot restores that file before its
warm-up request, which then reads one token: the same KV in every slot, the document read once
per server. The prompts are sent as token
ids, which llama.cpp reads as they are; the count the server reports reading is checked against
ours. The solo answers (the reference for "= alone") come from the first round's server (one
slot with --users 1,...), one question after another, before its round.
"""

from __future__ import annotations

import http.client
import json
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from bench.peers import PEER_TIMEOUT_S, llama_cpp_bin_dir
from bench.rss import PeakRss
from bench.serve_metrics import UserResult, round_row
from bench.serve_round import Ask, run_round

SERVER = "llama-server"
PEER_NAME = "llama.cpp server"
START_TIMEOUT_S = 600  # loading the GGUF file; a cold page cache on a shared disk is slow


class PeerMissing(RuntimeError):
    """llama-server is not built."""


def find_llama_server(home: Path) -> Path:
    """The llama-server that `make peers` builds, or PeerMissing saying how to build it."""
    binary = llama_cpp_bin_dir(home) / SERVER
    if not binary.exists():
        raise PeerMissing(f"{binary} does not exist: build llama.cpp's server with `make peers` "
                          "(or set RAPIDQA_LLAMA_CPP_BIN to a folder holding llama-server), or pass --no-peer")
    return binary


def server_command(binary: Path, gguf: Path, slots: int, prompt_tokens: int, new_tokens: int, threads: int,
                   port: int, slot_files: Path, extra: Sequence[str] = ()) -> list[str]:
    """llama-server with `slots` slots of prompt + answer tokens each, continuous batching, greedy;
    slots are saved to and restored from slot_files."""
    return [str(binary), "-m", str(gguf), "-np", str(slots), "-c", str(slots * (prompt_tokens + new_tokens)),
            "--cont-batching", "-t", str(threads), "-tb", str(threads), "--temp", "0", "-n", str(new_tokens),
            "--host", "127.0.0.1", "--port", str(port), "--no-webui", "--slot-save-path", str(slot_files), *extra]


def completion_request(prompt: Sequence[int], new_tokens: int, slot: int, stream: bool) -> dict[str, object]:
    """A /completion body: our prompt tokens, greedy, the slot's cached prefix reused."""
    return {"prompt": list(prompt), "n_predict": new_tokens, "temperature": 0, "cache_prompt": True,
            "id_slot": slot, "stream": stream, "return_tokens": True}


@dataclass(frozen=True)
class Server:
    port: int
    pid: int
    log: Path

    def connection(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=PEER_TIMEOUT_S)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def running_server(command: Callable[[int], list[str]]) -> Iterator[Server]:
    """Start llama-server (command(port)), wait until it has loaded the model, stop it afterwards."""
    port = _free_port()
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "llama-server.log"
        with log.open("w") as out:
            process = subprocess.Popen(command(port), stdout=out, stderr=subprocess.STDOUT)
        try:
            server = Server(port, process.pid, log)
            _wait_ready(server, process)
            yield server
        finally:
            process.terminate()
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _wait_ready(server: Server, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"llama-server exited ({process.returncode}): {server.log.read_text()[-2000:]}")
        try:
            connection = server.connection()
            connection.request("GET", "/health")
            if connection.getresponse().status == 200:
                return
        except OSError:
            pass  # not listening yet
        time.sleep(0.5)
    raise RuntimeError(f"llama-server did not get ready in {START_TIMEOUT_S} s: {server.log.read_text()[-2000:]}")


def _post(server: Server, body: dict[str, object], path: str = "/completion") -> http.client.HTTPResponse:
    connection = server.connection()
    connection.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    response = connection.getresponse()
    if response.status != 200:
        raise RuntimeError(f"llama-server answered {response.status}: {response.read()[-1000:]!r}")
    return response


PREFIX_FILE = "document-prefix.bin"


def warm_slots(server: Server, prefix: Sequence[int], slots: int) -> float:
    """Each slot reads the document prefix (one token predicted), so timed questions find it cached:
    slot 0 prefills it and saves it, the others restore it first. Seconds."""
    started = time.perf_counter()
    for slot in range(slots):
        if slot > 0:
            _post(server, {"filename": PREFIX_FILE}, f"/slots/{slot}?action=restore").read()
        reply = json.loads(_post(server, completion_request(prefix, 1, slot, stream=False)).read())
        if reply.get("tokens_evaluated") != len(prefix):
            raise RuntimeError(f"llama-server read {reply.get('tokens_evaluated')} prefix tokens, ours {len(prefix)}")
        if slot == 0 and slots > 1:
            _post(server, {"filename": PREFIX_FILE}, "/slots/0?action=save").read()
    return time.perf_counter() - started


def server_user(server: Server, question_id: str, prompt: Sequence[int], new_tokens: int, slot: int) -> tuple[str, Ask]:
    """A user streaming one answer from the server: time to the first chunk carrying a token, then to the last."""

    def ask(started: float) -> UserResult:
        response = _post(server, completion_request(prompt, new_tokens, slot, stream=True))
        first: float | None = None
        tokens: list[int] = []
        final: dict[str, object] | None = None
        for line in response:
            if not line.startswith(b"data: "):
                continue
            chunk = json.loads(line[len(b"data: "):])
            if "error" in chunk:
                raise RuntimeError(f"llama-server: {chunk['error']}")
            if chunk.get("tokens") and first is None:
                first = time.perf_counter() - started
            tokens += chunk.get("tokens") or []
            if chunk.get("stop"):
                final = chunk
                break
        ended = time.perf_counter()
        if final is None:
            raise RuntimeError("llama-server's stream ended without a final chunk")
        if final.get("tokens_evaluated") != len(prompt):  # token ids go in as they are: a mismatch is a bug
            raise RuntimeError(f"llama-server read {final.get('tokens_evaluated')} prompt tokens, ours {len(prompt)}")
        if final.get("stop_type") == "eos" and tokens:
            tokens = tokens[:-1]  # the server streams the end-of-answer token too; Engine.answer's tokens leave it out
        return UserResult(question_id, first, ended - started, tokens, started, ended)

    return question_id, ask


def peer_rows(binary: Path, gguf: Path, prompts: Sequence[tuple[str, list[int]]], prefix: list[int],
              user_counts: Sequence[int], new_tokens: int, threads: int, extra: Sequence[str],
              log: Callable[[str], None]) -> tuple[list[dict[str, object]], dict[str, object]]:
    """The peer's rows, one per user count, and what ran (commands, warm-up seconds)."""
    longest = max(len(tokens) for _, tokens in prompts)

    slot_files = Path(tempfile.mkdtemp(prefix="llama-slots-"))

    def command(slots: int) -> Callable[[int], list[str]]:
        return lambda port: server_command(binary, gguf, slots, longest, new_tokens, threads, port, slot_files, extra)

    try:
        return _rounds(command, prompts, prefix, user_counts, new_tokens, log)
    except (OSError, http.client.HTTPException) as error:  # the server died or dropped a connection
        raise RuntimeError(f"{PEER_NAME}: {type(error).__name__}: {error}") from error
    finally:
        shutil.rmtree(slot_files, ignore_errors=True)


def _rounds(command: Callable[[int], Callable[[int], list[str]]], prompts: Sequence[tuple[str, list[int]]],
            prefix: list[int], user_counts: Sequence[int], new_tokens: int,
            log: Callable[[str], None]) -> tuple[list[dict[str, object]], dict[str, object]]:
    commands: dict[str, list[str]] = {}
    warm_s: dict[str, float] = {}
    solo: dict[str, UserResult] = {}
    rows = []
    for count in user_counts:
        with running_server(command(count)) as server:
            commands[str(count)] = command(count)(server.port)
            log(f"[{PEER_NAME}: {count} slot(s), each given the {len(prefix)}-token document prefix]")
            warm_s[str(count)] = warm_slots(server, prefix, count)
            if not solo:
                log(f"[{PEER_NAME}: the {len(prompts)} questions alone]")
                solo = {question_id: run_round([server_user(server, question_id, tokens, new_tokens, 0)])[0]
                        for question_id, tokens in prompts}
            users = [server_user(server, question_id, tokens, new_tokens, slot)
                     for slot, (question_id, tokens) in enumerate(prompts[:count])]
            log(f"[{PEER_NAME}: {count} user(s) at once]")
            with PeakRss(server.pid) as peak:
                results = run_round(users)
            rows.append(round_row(PEER_NAME, results, solo, peak.gb))
    alone = {q: {"answer_s": r.answer_s, "first_token_s": r.first_token_s, "tokens": len(r.tokens), "error": r.error}
             for q, r in solo.items()}
    return rows, {"commands": commands, "warm_s": warm_s, "solo": alone}
