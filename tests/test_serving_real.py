"""Many users at once on real models: batched answers equal the same questions answered alone, a Stop
leaves nothing running, and the web server serves two users at the same time."""

from __future__ import annotations

import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from app.events import Done, Preparing, StillReading, Token
from app.pipeline import Engine, answer_once
from tests.ui_helpers import free_port, real_settings, serving, small_model, small_pdf, wait_until

pytestmark = pytest.mark.real_models

QUESTIONS = (
    "Which version of R is this manual for?",
    "What is the title of this manual?",
    "Who holds the copyright of this manual?",
    "What does the manual say about permission to copy it?",
    "Which chapters does the manual list first?",
)


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> tuple[Engine, object]:
    home = tmp_path_factory.mktemp("serving-home")
    settings = real_settings(home, small_model(), free_port(), max_new_tokens=64)
    engine = Engine(settings)
    index = engine.open_index(home / "index")
    engine.ingest(index, [small_pdf(home / "R-data-p1-3.pdf")], progress=False)
    return engine, index


def rapidqa_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("rapidqa-") and t.is_alive()]


class User(threading.Thread):
    """One user streaming an answer; `stop_after` tokens closes the stream early (Stop)."""

    def __init__(self, engine: Engine, index: object, question: str, method: str,
                 start_after: threading.Event | None = None, stop_after: int | None = None) -> None:
        super().__init__(daemon=True)
        self.engine, self.index, self.question, self.method = engine, index, question, method
        self.start_after, self.stop_after = start_after, stop_after
        self.done: Done | None = None
        self.first_token = threading.Event()
        self.tokens = 0

    def run(self) -> None:
        if self.start_after is not None:
            self.start_after.wait(120)
        decoding = replace(self.engine.settings.decoding, method=self.method)
        events = self.engine.answer(self.question, self.index, decoding)
        for event in events:
            if isinstance(event, Token):
                self.tokens += 1
                self.first_token.set()
                if self.stop_after is not None and self.tokens >= self.stop_after:
                    events.close()
                    return
            elif isinstance(event, Done):
                self.done = event


@pytest.mark.parametrize("plan_drafts", [False, True])
def test_batched_answers_equal_the_same_questions_alone(engine, plan_drafts: bool) -> None:
    """LC, RAPID and lookup side by side, one user joining mid-stream and one pressing Stop: every
    finished answer has the tokens of the same question asked alone, and passes were shared. With
    the configured gamma the RAPID sessions draft and are sometimes wrong; with planned drafts (the
    0.5B drafting for itself: drafts cost as much as the target's rows) the tokens stay the same."""
    engine, index = engine
    engine.settings = replace(engine.settings, plan_drafts=plan_drafts)
    plan = [("lc", QUESTIONS[0]), ("rapid", QUESTIONS[1]), ("lookup", QUESTIONS[2]), ("rapid", QUESTIONS[3])]
    alone = [answer_once(engine, q, index, replace(engine.settings.decoding, method=m)) for m, q in plan]
    shared = engine.scheduler.shared_passes
    users = [User(engine, index, q, m) for m, q in plan[:3]]
    users.append(User(engine, index, plan[3][1], plan[3][0], start_after=users[0].first_token))
    stopped = User(engine, index, QUESTIONS[4], "lc", stop_after=2)
    for user in [*users, stopped]:
        user.start()
    for user in [*users, stopped]:
        user.join(600)
        assert not user.is_alive()
    for user, solo, (method, question) in zip(users, alone, plan, strict=True):
        assert user.done is not None, (method, question)
        assert user.done.token_ids == solo.token_ids, (method, question)
    rapid = [u.done.stats for u in users if u.method == "rapid" and u.done is not None]
    if not plan_drafts:
        assert sum(s.drafted for s in rapid) > sum(s.accepted for s in rapid) > 0  # drafted, right and wrong
    else:
        assert all(s.draft_lengths for s in rapid)  # the scheduler chose
    assert stopped.done is None and stopped.tokens == 2
    assert engine.scheduler.shared_passes > shared
    deadline = time.monotonic() + 30
    while engine.scheduler.active_sessions() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert engine.scheduler.active_sessions() == 0


def test_a_stop_during_the_documents_first_read_leaves_no_work_running(tmp_path: Path) -> None:
    """Stop pressed while a first question waits for the documents' prefill: the prefill stops at its
    next chunk instead of running on (and the next question would otherwise run beside it)."""
    settings = real_settings(tmp_path / "home", small_model(), free_port(), max_new_tokens=16)
    engine = Engine(replace(settings, drafter_chunk_kv=False))
    index = engine.open_index(tmp_path / "index")
    index.add_files([small_pdf(tmp_path / "R-data-p1-12.pdf", pages=12)], progress=False)
    prompt = engine.document_prompt(index)
    assert prompt is not None and len(prompt.prefix) > 2048  # more than one chunk to read
    events = engine.answer(QUESTIONS[0], index, replace(settings.decoding, method="lc"))
    for event in events:
        if isinstance(event, Preparing) and event.done > 0:  # a chunk has been read
            break
    events.close()
    deadline = time.monotonic() + 120
    while (engine.scheduler.active_sessions() or rapidqa_threads()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert engine.scheduler.active_sessions() == 0 and not rapidqa_threads()
    passes = engine.scheduler.passes
    time.sleep(3)
    assert engine.scheduler.passes == passes  # nothing runs on
    assert not engine.prefix_cache.contains(engine.target.model, prompt.prefix)
    assert engine.preparing() is None


def test_a_question_during_the_documents_first_read_is_answered_from_the_passages(tmp_path: Path) -> None:
    """An upload's documents are being read (in the background) when a question comes: it is answered
    at once from the retrieved passages and labelled so; the read goes on to its end untouched, and a
    later question reads the full documents."""
    settings = real_settings(tmp_path / "home", small_model(), free_port(), max_new_tokens=16)
    engine = Engine(replace(settings, drafter_chunk_kv=False))
    index = engine.open_index(tmp_path / "index")
    index.add_files([small_pdf(tmp_path / "R-data-p1-12.pdf", pages=12)], progress=False)
    prompt = engine.document_prompt(index)
    assert prompt is not None and len(prompt.prefix) > 2048  # more than one chunk to read
    reading = engine.prepare_in_background(index)
    assert wait_until(lambda: (engine.preparing() or Preparing("", 0, 1, None, None)).done > 0, 300)

    asked = time.perf_counter()
    events = list(engine.answer(QUESTIONS[0], index, replace(settings.decoding, method="rapid")))
    done = events[-1]
    assert isinstance(done, Done) and done.still_reading and done.stats.method == "rag"
    assert any(isinstance(e, StillReading) for e in events)
    assert done.stats.generated > 0 and done.stats.question_to_first_s < time.perf_counter() - asked
    assert done.stats.wait_s < 1.0  # it did not wait for the read

    reading.join(600)
    assert not reading.is_alive() and engine.prefix_cache.contains(engine.target.model, prompt.prefix)
    later = answer_once(engine, QUESTIONS[0], index, replace(settings.decoding, method="rapid"))
    assert not later.still_reading and later.stats.method == "rapid"
    assert later.stats.prefix_cached_tokens == len(prompt.prefix)  # the read's KV, not a second read


def test_two_web_users_are_served_at_the_same_time(engine) -> None:
    """Two gradio_client users asking at once share passes: the second does not wait for the first."""
    from gradio_client import Client

    from ui.blocks import build_app

    engine, index = engine
    settings = replace(engine.settings, server=replace(engine.settings.server, port=free_port()))
    engine.settings = settings
    answered: dict[int, tuple[float, float]] = {}

    with serving(build_app(engine, index.directory), settings) as url:
        clients = [Client(url, verbose=False) for _ in range(2)]
        clients[0].predict(QUESTIONS[0], "lc", 24, api_name="/ask")  # warm
        together = threading.Barrier(2)

        def ask(user: int) -> None:
            together.wait()
            started = time.perf_counter()
            clients[user].predict(QUESTIONS[user + 1], "lc", 64, api_name="/ask")
            answered[user + 1] = (started, time.perf_counter())

        shared = engine.scheduler.shared_passes
        users = [threading.Thread(target=ask, args=(i,)) for i in (0, 1)]
        for user in users:
            user.start()
        for user in users:
            user.join(300)
    (a0, a1), (b0, b1) = answered[1], answered[2]
    assert max(a0, b0) < min(a1, b1)  # the two answers were in flight together
    assert engine.scheduler.shared_passes > shared


def test_four_users_at_once_take_at_most_half_the_time_of_one_after_another(engine) -> None:
    """Through ask serve's /ask API: four different questions asked at once get the answers they get
    one after another, in at most half the wall time (the passes are shared, the weights read once)."""
    from concurrent.futures import ThreadPoolExecutor

    from gradio_client import Client

    from ui.blocks import build_app

    engine, index = engine
    settings = replace(engine.settings, server=replace(engine.settings.server, port=free_port()))
    engine.settings = settings
    # Questions with long answers: the test is about the decoding passes, not the fixed costs around them.
    questions = ("Describe in detail what this manual covers.",
                 "List the chapters of this manual with what each covers.",
                 "Explain the copyright and permission notice of this manual in full.",
                 "Describe everything the title page of this manual says.")
    with serving(build_app(engine, index.directory), settings) as url:
        clients = {question: Client(url, verbose=False) for question in questions}

        def ask(question: str) -> str:
            return clients[question].predict(question, "rapid", 64, api_name="/ask")[0]

        ask(questions[0])  # warm
        sequential = concurrent = 0.0
        for _ in range(2):  # two rounds, interleaved: a busy moment of the host weighs on both
            started = time.perf_counter()
            one_by_one = [ask(q) for q in questions]
            sequential += time.perf_counter() - started
            started = time.perf_counter()
            with ThreadPoolExecutor(len(questions)) as pool:
                together = list(pool.map(ask, questions))
            concurrent += time.perf_counter() - started
            assert together == one_by_one
    print(f"\nfour questions, two rounds: one after another {sequential:.1f} s, at once {concurrent:.1f} s")
    assert concurrent <= 0.5 * sequential, (concurrent, sequential)
