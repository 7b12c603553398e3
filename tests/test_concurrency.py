"""Several users at once: queued answers through the Gradio API, and indexes that never mix."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import psutil
import pytest

from app.pipeline import Engine, answer_once
from tests.ui_helpers import EXPECTED, QUESTION, free_port, real_settings, serving, small_model, small_pdf

pytestmark = pytest.mark.real_models
USERS = 20


class PeakMemory:
    """Samples this process's resident memory in the background (the app runs in this process)."""

    def __init__(self) -> None:
        self.process = psutil.Process()
        self.peak = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()


def test_twenty_concurrent_questions_are_queued_and_all_answered(tmp_path: Path,
                                                                  tmp_path_factory: pytest.TempPathFactory) -> None:
    from gradio_client import Client, handle_file

    from ui.blocks import build_app

    model = small_model()
    home = tmp_path_factory.getbasetemp() / "ui-real-home"  # shares the prefix cache with the UI tests
    settings = real_settings(home, model, free_port(), max_new_tokens=16)
    engine = Engine(settings)
    pdf = small_pdf(tmp_path / "R-data-p1-3.pdf")
    with serving(build_app(engine, tmp_path / "index"), settings) as url:
        Client(url, verbose=False).predict([handle_file(str(pdf))], api_name="/upload")
        Client(url, verbose=False).predict(QUESTION, "lc", 16, api_name="/ask")  # warm: prefix cached
        baseline = psutil.Process().memory_info().rss

        def ask(_: int) -> tuple[str, dict, list]:
            return Client(url, verbose=False).predict(QUESTION, "lc", 16, api_name="/ask")

        start = time.perf_counter()
        with PeakMemory() as memory, ThreadPoolExecutor(USERS) as pool:
            results = list(pool.map(ask, range(USERS)))
        wall = time.perf_counter() - start
    answers = [answer for answer, _, _ in results]
    grown_mb = (memory.peak - baseline) / 2**20
    print(f"\n{USERS} concurrent questions: {sum(EXPECTED in a for a in answers)} correct, wall {wall:.1f} s, "
          f"peak RSS {memory.peak / 2**20:.0f} MiB (+{grown_mb:.0f} MiB over the idle app)")
    assert all(EXPECTED in answer for answer in answers), answers
    assert all(stats["generated"] > 0 for _, stats, _ in results)
    assert len(set(answers)) == 1  # greedy: queued users get the same answer, nobody a mixed stream
    assert grown_mb < 1024  # bounded: requests wait in the queue, they do not each hold a model run


def test_separate_indexes_never_see_each_others_documents(tmp_path: Path) -> None:
    model = small_model()
    settings = real_settings(tmp_path / "home", model, free_port(), max_new_tokens=20)
    settings = replace(settings, decoding=replace(settings.decoding, method="lc"))
    engine = Engine(settings)
    manual = engine.open_index(tmp_path / "manual")
    manual.add_file(small_pdf(tmp_path / "R-data-p1-3.pdf"))
    notes_file = tmp_path / "harbour-notes.txt"
    notes_file.write_text("Harbour notes.\n\nThe lighthouse keeper of Port Alder is named Miriam Okafor. "
                          "She has kept the light since 1987.\n")
    notes = engine.open_index(tmp_path / "notes")
    notes.add_file(notes_file)

    jobs = [(manual, QUESTION, "R-data-p1-3.pdf", EXPECTED),
            (notes, "Who is the lighthouse keeper of Port Alder?", "harbour-notes.txt", "Miriam")] * 3
    with ThreadPoolExecutor(len(jobs)) as pool:
        done = list(pool.map(lambda job: answer_once(engine, job[1], job[0]), jobs))
    for (_, _, source, expected), result in zip(jobs, done, strict=True):
        assert {c.source for c in result.citations} == {source}
        assert expected in result.answer, result.answer
