"""RAG reads its passages from the target's per-chunk KV (or, as an option, prefills them together),
and a question asked while its documents are first read is answered at once from the passages,
labelled so, without stopping that read."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from app.config import RAG_READ_JOINT, Settings
from app.events import STILL_READING, Done, Preparing, StillReading
from app.openai_chunks import Final, completion
from app.options import add_decoding_options, settings_from_args
from app.pipeline import Engine, answer_once
from app.report import done_record, summary_text
from decoding.generate import generate, run_to_end
from decoding.settings import DecodingSettings
from retrieval.index import HybridIndex
from tests.retrieval_fixtures import write
from tests.test_bench_path import DOCUMENTS, QUESTION
from tests.tiny_engine import tiny_engine

RAG = DecodingSettings(method="rag", max_new_tokens=12, gamma=4, eta=0.0)


def make_engine(home: Path, **settings: object) -> Engine:
    return tiny_engine(home, RAG, **settings)


def add_documents(engine: Engine, tmp_path: Path) -> HybridIndex:
    """The documents indexed, nothing prepared (no prefill, no chunk KV)."""
    index = engine.open_index(tmp_path / "index")
    for name, text in DOCUMENTS.items():
        index.add_file(write(tmp_path / name, " ".join([text] * 3)))
        time.sleep(0.01)  # distinct ingest times
    return index


@pytest.fixture
def engine(tmp_path: Path) -> Engine:
    return make_engine(tmp_path / "home")


@pytest.fixture
def index(engine: Engine, tmp_path: Path) -> Iterator[HybridIndex]:
    opened = add_documents(engine, tmp_path)
    yield opened
    opened.close()


def test_rag_reads_the_targets_chunk_kv_and_prefills_only_the_question(engine: Engine, index: HybridIndex) -> None:
    contexts, long_prompt, rag_prompt = engine.prompts(QUESTION, index, RAG)
    assert len(contexts.rag_chunk_ids) >= 2  # several passages, each encoded apart
    store = engine.chunk_kv(index, engine.settings.models.target)
    passages = store.prompt_passages(rag_prompt, contexts.rag_chunk_ids)
    assert store.missing(passages) == passages  # nothing built before the first question (lazy)

    events = list(engine.answer(QUESTION, index, RAG))
    done = events[-1]
    assert isinstance(done, Done) and done.stats.method == "rag" and not done.still_reading
    # Its progress names the model that reads the passages.
    assert {e.what for e in events if isinstance(e, Preparing)} == {"Target reading passages"}
    assert done.stats.prefix_cached_tokens == len(rag_prompt.prefix)  # only the question was prefilled
    assert store.missing(passages) == []  # built by that question, stored for the next
    # Exactly the tokens of the target on the assembled chunk KV.
    hooks = store.hooks(rag_prompt, contexts.rag_chunk_ids)
    alone = run_to_end(generate("rag", engine.target, None, long_prompt, rag_prompt, RAG, rag_prefix=hooks))
    assert done.token_ids == alone.token_ids
    again = answer_once(engine, QUESTION, index, RAG)
    assert again.token_ids == done.token_ids and again.stats.wait_s < done.stats.wait_s + 1.0


def test_rag_read_joint_prefills_the_passages_together(tmp_path: Path) -> None:
    engine = make_engine(tmp_path / "home", rag_read=RAG_READ_JOINT)
    index = add_documents(engine, tmp_path)
    _, long_prompt, rag_prompt = engine.prompts(QUESTION, index, RAG)
    done = answer_once(engine, QUESTION, index, RAG)
    assert done.stats.prefix_cached_tokens == 0
    joint = run_to_end(generate("rag", engine.target, None, long_prompt, rag_prompt, RAG))
    assert done.token_ids == joint.token_ids
    store = engine.chunk_kv(index, engine.settings.models.target)
    assert store.store.names() == []  # nothing encoded per chunk


def test_rag_read_is_an_option_with_named_choices() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    add_decoding_options(parser)
    assert settings_from_args(parser.parse_args([])).rag_read == "chunk-kv"
    assert settings_from_args(parser.parse_args(["--rag-read", "joint"])).rag_read == "joint"
    with pytest.raises(ValueError, match="choose one of chunk-kv, joint"):
        Settings(rag_read="both")


def _blocked_preparation(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """The index's background preparation (an upload's) holds until the returned event is set."""
    release = threading.Event()
    real_prepare = engine.prepare

    def prepare(index: HybridIndex, progress: bool = False) -> None:
        assert release.wait(60)
        real_prepare(index, progress)

    monkeypatch.setattr(engine, "prepare", prepare)
    return release


def test_a_question_during_the_first_read_is_answered_from_the_passages(
    engine: Engine, index: HybridIndex, monkeypatch: pytest.MonkeyPatch
) -> None:
    lc = replace(RAG, method="lc")
    release = _blocked_preparation(engine, monkeypatch)
    reading = engine.prepare_in_background(index)
    events = list(engine.answer(QUESTION, index, lc, compare=True))
    done = events[-1]
    assert isinstance(done, Done) and done.still_reading
    assert any(isinstance(e, StillReading) for e in events)
    assert done.stats.method == "rag" and done.lc_stats is None  # no LC comparison without the documents
    # The target's chunk KV is not built yet: the passages are prefilled together (fewest passes).
    assert done.stats.prefix_cached_tokens == 0
    _, long_prompt, rag_prompt = engine.prompts(QUESTION, index, lc)
    assert done.token_ids == run_to_end(generate("rag", engine.target, None, long_prompt, rag_prompt, lc)).token_ids
    assert done_record(done)["still_reading"] == STILL_READING
    assert STILL_READING in summary_text(done)
    assert not engine.prefix_cache.contains(engine.target.model, long_prompt.prefix)

    release.set()  # the read goes on to the end: the question did not stop it
    reading.join(60)
    assert not reading.is_alive()
    assert engine.prefix_cache.contains(engine.target.model, long_prompt.prefix)
    later = answer_once(engine, QUESTION, index, lc)
    assert not later.still_reading and later.stats.method == "lc"
    assert later.stats.prefix_cached_tokens == len(long_prompt.prefix)
    assert done_record(later)["still_reading"] is None


def test_a_question_during_another_questions_read_is_answered_from_the_passages(
    engine: Engine, index: HybridIndex
) -> None:
    """Another request reads the window (a job for its prefix): the question does not wait for it."""
    lc = replace(RAG, method="lc")
    _, long_prompt, _ = engine.prompts(QUESTION, index, lc)
    key = engine.prefix_cache.key(engine.target.model, long_prompt.prefix)
    job = engine._start_job(key, "Reading documents", len(long_prompt.prefix))
    answers: list[Done] = []
    asker = threading.Thread(target=lambda: answers.append(answer_once(engine, QUESTION, index, lc)), daemon=True)
    asker.start()
    asker.join(30)
    engine._end_job(key, job)  # a question still waiting for that read then reads the documents itself
    asker.join(60)
    done = answers[0]
    assert done.still_reading and done.stats.method == "rag"
    # Nobody reads it now: the next question reads the documents itself and waits for them.
    later = answer_once(engine, QUESTION, index, lc)
    assert not later.still_reading and later.stats.method == "lc"


def test_the_apis_final_chunk_says_the_answer_came_from_the_passages(
    engine: Engine, index: HybridIndex, monkeypatch: pytest.MonkeyPatch
) -> None:
    release = _blocked_preparation(engine, monkeypatch)
    reading = engine.prepare_in_background(index)
    try:
        pieces = list(completion(engine.answer(QUESTION, index, replace(RAG, method="rapid"))))
    finally:
        release.set()
        reading.join(60)
    final = pieces[-1]
    assert isinstance(final, Final) and final.record["still_reading"] == STILL_READING


def test_the_documents_are_read_in_the_background(engine: Engine, index: HybridIndex,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Every pass of the preparation (the drafter's chunk KV, the window's first read) yields to the
    questions asked meanwhile (decoding/scheduler.py); a question's own passes do not."""
    passes: list[tuple[str, bool]] = []
    submit = engine.scheduler.submit

    def recorded(ticket, model, rows):
        passes.append((ticket.name, ticket.background))
        return submit(ticket, model, rows)

    monkeypatch.setattr(engine.scheduler, "submit", recorded)
    engine.prepare(index)
    assert {name for name, _ in passes} == {"drafter-kv", "documents"} and all(b for _, b in passes), passes
    passes.clear()
    answer_once(engine, QUESTION, index, replace(RAG, method="lc"))
    assert passes and not any(b for _, b in passes), passes
