"""Helpers for the UI tests: model lookup, a scripted engine, a server in a thread, Chromium.

Kept out of conftest.py (shared with other test suites); the UI test files import from here.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.config import Limits, ModelSettings, ServerSettings, Settings
from app.conversation import FollowUp, Turn
from app.errors import QuestionError
from app.events import Done, Event, Preparing, Progress, Sources, Status, StillReading, Token
from app.speedup import Speedup
from decoding.settings import DecodingSettings
from decoding.stats import Stats
from retrieval.types import Citation, RetrievalSettings
from tests.resources import SMALL, require_chromium, require_model
from tests.retrieval_fixtures import HashEmbedder, text_pdf, word_tokens

if TYPE_CHECKING:
    import gradio as gr
    from playwright.sync_api import BrowserContext
    from starlette.routing import BaseRoute

    from retrieval.index import HybridIndex

REPO = Path(__file__).resolve().parents[1]
R_DATA = REPO / "data" / "R-data.pdf"
ARTIFACTS = REPO / "artifacts"
SMALL_MODEL = SMALL
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run", "--disable-quic",
]
# What the browser test asks about the 3-page excerpt of R-data.pdf, and a word the answer must hold.
QUESTION = "Which version of R is this manual for?"
EXPECTED = "4.2.2"


def small_model() -> Path:
    """The 0.5B model directory, or skip the test (fail it under CI) saying where it was looked for."""
    return require_model(SMALL_MODEL)


def real_settings(home: Path, model: Path, port: int, max_new_tokens: int = 24) -> Settings:
    """0.5B as target and drafter (self-speculation), short answers: keeps a real answer to seconds."""
    return Settings(
        home=home,
        models=ModelSettings(target=str(model), drafter=str(model)),
        decoding=DecodingSettings(method="rapid", max_new_tokens=max_new_tokens),
        server=ServerSettings(port=port),
    )


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def small_pdf(dest: Path, pages: int = 3) -> Path:
    """The first pages of R-data.pdf (title, copyright with the R version, contents): a real PDF
    whose long context is a few hundred tokens, so prefill stays short on a CPU."""
    from pypdf import PdfReader, PdfWriter

    writer = PdfWriter()
    for page in PdfReader(R_DATA).pages[:pages]:
        writer.add_page(page)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with dest.open("wb") as out:
        writer.write(out)
    return dest


def bad_files(folder: Path) -> dict[str, Path]:
    """A truncated PDF, a Windows executable and an empty text file."""
    folder.mkdir(parents=True, exist_ok=True)
    corrupt = folder / "corrupt.pdf"
    corrupt.write_bytes(text_pdf(["A page that will be cut off"])[:120])
    program = folder / "setup.exe"
    program.write_bytes(b"MZ\x90\x00\x03\x00\x00\x00\x04\x00" + bytes(64))
    empty = folder / "empty.txt"
    empty.write_bytes(b"")
    return {"corrupt": corrupt, "exe": program, "empty": empty}


@contextmanager
def serving(demo: gr.Blocks, settings: Settings, routes: Sequence[BaseRoute] = ()) -> Iterator[str]:
    """Run the app through ui.serve.launch (the code path of `ask serve`) in a background thread;
    `routes`: the /v1 API (app.api), served by the same app as `ask serve` does."""
    from ui.serve import launch

    launch(demo, settings, prevent_thread_lock=True, routes=routes)
    try:
        yield f"http://127.0.0.1:{settings.server.port}/"
    finally:
        demo.close()


@contextmanager
def chromium(user_data: Path) -> Iterator[BrowserContext]:
    """Headless Debian Chromium with a fresh profile (Playwright's own browser download is not used)."""
    from playwright.sync_api import sync_playwright

    executable = require_chromium()
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(user_data), executable_path=str(executable), headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1500, "height": 1000},
        )
        try:
            yield context
        finally:
            context.close()


def listening_addresses(pid: int, port: int) -> set[str]:
    """Local addresses a process listens on at this port."""
    import psutil

    process = psutil.Process(pid)
    connections = process.net_connections(kind="tcp")
    return {c.laddr.ip for c in connections if c.status == psutil.CONN_LISTEN and c.laddr.port == port}


def wait_until(predicate: Any, timeout: float, interval: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False


# --- a scripted engine: the UI's contract with app.pipeline, without models ----------------------


class ScriptedEngine:
    """Engine's interface as the UI uses it (settings, open_index, answer, delete), answering from a script.

    Indexes are real HybridIndex instances with a word tokenizer and a hashing embedder, so uploads
    go through the real readers and index. "boom" in a question raises an unexpected error; "slow"
    spaces the tokens out, so a test can stop an answer midway. `finished` counts answers whose
    generator ended (normally, by error, or closed), which is what releases the real engine's lock.
    """

    ANSWER = ("The manual ", "is for R ", "version 4.2.2.")

    def __init__(self, home: Path, **limits: int) -> None:
        self.settings = Settings(home=home, limits=replace(Limits(), **limits),
                                 retrieval=RetrievalSettings(similarity_floor=0.0),
                                 server=ServerSettings(port=free_port()))
        self.log = print
        self.questions: list[tuple[str, DecodingSettings, bool]] = []
        self.finished = 0
        self.histories: list[tuple[Turn, ...]] = []  # each answer's conversation so far
        self.closed = 0  # answers whose generator was closed before its end (a client went away, Stop)
        self.now_preparing: Preparing | None = None
        self.parts: list[str] = []  # what reading_parts reports: a corpus larger than the window
        # What documents_ready reports; while False, an "early" question is answered from the passages.
        self.ready = True

    def open_index(self, directory: Path | None = None) -> HybridIndex:
        from retrieval.index import HybridIndex

        return HybridIndex(directory or self.settings.default_index_dir, self.settings.retrieval, word_tokens,
                           HashEmbedder())

    def prepare_in_background(self, index: HybridIndex) -> None:
        """Nothing to prepare: the script needs no KV."""

    def preparing(self) -> Preparing | None:
        """What a test sets in `now_preparing`, as the real engine reports its background prefill."""
        return self.now_preparing

    def reading_parts(self, index: HybridIndex) -> list[str]:
        return self.parts

    def documents_ready(self, index: HybridIndex) -> bool:
        return self.ready

    def delete(self, index: HybridIndex, doc_id_or_source: str) -> bool:
        return index.delete(doc_id_or_source)

    def answer(self, question: str, index: HybridIndex, decoding: DecodingSettings | None = None,
               compare: bool = False, retrieval: RetrievalSettings | None = None,
               history: Sequence[Turn] = (), style: str | None = None) -> Iterator[Event]:
        decoding = decoding or self.settings.decoding
        self.histories.append(tuple(history))
        if not question.strip():
            raise QuestionError("The question is empty.")
        decoding.validate()
        self.questions.append((question, decoding, compare))
        try:
            yield from self._script(question, decoding, compare, tuple(history))
        except GeneratorExit:
            self.closed += 1
            raise
        finally:
            self.finished += 1

    def _script(self, question: str, decoding: DecodingSettings, compare: bool,
                history: tuple[Turn, ...]) -> Iterator[Event]:
        yield Status("Retrieving passages")
        citations = [Citation("manual.pdf", 2, None, "This manual is for R, version 4.2.2 <b>Patched</b>", 0.5)]
        # A follow-up is "rewritten" by naming the previous question.
        follow_up = FollowUp(f"{question} (after: {history[-1].question})", len(history), 0) if history else None
        yield Sources(citations, follow_up=follow_up)
        if "boom" in question:
            raise RuntimeError("secret internal detail")
        if "prefill" in question:  # the documents' prefill keeps the answer waiting, with progress
            for done in (0, 40, 80):
                yield Preparing("Reading documents", done, 120, 40.0 if done else None, (120 - done) / 40.0)
                time.sleep(0.6)
        still_reading = "early" in question and not self.ready
        if still_reading:  # the documents are being read: the engine answers from the passages
            yield StillReading()
        stats = Stats(method=decoding.method, context_tokens=600, draft_context_tokens=300, prefill_s=0.5)
        speedup = Speedup(None, "no LC run measured yet at this context length (use compare)")
        for piece in self.ANSWER:
            stats.generated += 2
            stats.drafted += 3
            stats.accepted += 1
            stats.target_passes += 1
            stats.decode_s += 0.25
            stats.accepted_lengths.append(2)
            yield Token(piece)
            yield Progress(stats, speedup)
            if "slow" in question:
                time.sleep(2)
        stats.finish_reason = "eos"
        if compare:
            speedup = Speedup(1.5, "measured side by side on this input")
        yield Done("".join(self.ANSWER), stats, citations, speedup,
                   Stats(method="lc", generated=6, decode_s=2.25) if compare else None, follow_up=follow_up,
                   still_reading=still_reading)
