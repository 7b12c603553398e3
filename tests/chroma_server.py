"""A real Chroma server (`chroma run`, the chromadb package's CLI) for the tests of a shared corpus."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.resources import missing, stop_process


def chroma_cli() -> Path:
    """The `chroma` command installed with the chromadb package (beside this Python), else on PATH."""
    beside = Path(sys.executable).parent / "chroma"
    found = beside if beside.exists() else shutil.which("chroma")
    if found is None:
        missing("the chroma CLI (installed with the chromadb package) was not found")
    return Path(found)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


@contextmanager
def chroma_server(data: Path, timeout: float = 60.0) -> Iterator[str]:
    """`chroma run` on a free loopback port with its data in `data`; yields its URL."""
    port = _free_port()
    data.mkdir(parents=True, exist_ok=True)
    log = data.parent / f"chroma-{port}.log"
    with log.open("w") as out:
        server = subprocess.Popen([str(chroma_cli()), "run", "--path", str(data), "--host", "127.0.0.1",
                                   "--port", str(port)], stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout
        while not _listening(port):
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"chroma run did not start:\n{log.read_text()[-2000:]}")
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_process(server, 20)
