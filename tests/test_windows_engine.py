"""The engine over a corpus larger than the target's window (tiny models, byte tokens): each
window prefilled once, questions routed to their evidence's window, exact answers there."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import app.documents as documents
from app.config import Limits, ModelSettings, Settings
from app.events import Done, Sources
from app.pipeline import Engine, answer_once
from app.report import done_record, summary_text
from decoding import kv_quant
from decoding.prefill import prefill_parts
from decoding.prefix_cache import PrefixCache
from decoding.settings import DecodingSettings
from retrieval.index import HybridIndex
from retrieval.types import RetrievalSettings
from tests.retrieval_fixtures import HashEmbedder, write
from tests.tiny import tiny_model

TOPICS = {
    "alpaca.txt": "Alpacas are shorn in spring and their fleece is spun into yarn by the weavers of Cusco.",
    "glacier.txt": "Glaciers grind valleys into a U shape as the ice flows downhill past moraines.",
    "volcano.txt": "Basalt lava from shield volcanoes is runny and spreads over wide plains of rock.",
    "comet.txt": "Comets grow bright tails of dust and gas when they swing close to the sun.",
    "orchid.txt": "Orchids hold their pollen in sticky pollinia that bees carry from flower to flower.",
    "tide.txt": "Spring tides rise highest when the moon and the sun pull along one line.",
}
QUESTIONS = {  # each asks about one document in its own words
    "alpaca.txt": "Who spins alpaca fleece into yarn?",
    "volcano.txt": "How does basalt lava from shield volcanoes spread?",
    "orchid.txt": "What do bees carry in orchid pollinia?",
}
DECODING = DecodingSettings(method="lc", max_new_tokens=12, gamma=4, eta=0.0)


def make_engine(home: Path, kv_dtype: torch.dtype | None = None) -> Engine:
    """kv_dtype: what the tiny models' caches store (None: fp32, their dtype; torch.uint8: 8-bit)."""
    settings = Settings(
        home=home, models=ModelSettings(target="tiny-target", drafter="tiny-drafter"),
        retrieval=RetrievalSettings(chunk_tokens=64, budget_min_tokens=150, budget_fraction=0.0),
        decoding=DECODING, limits=Limits(max_new_tokens=32), kv_dtype="q8" if kv_dtype else "bf16",
    )
    engine = Engine(settings, log=lambda _: None)
    # A 1024-position target holds about two of these documents per window.
    engine._models["tiny-target"] = tiny_model(1, max_positions=1024, kv_dtype=kv_dtype)
    engine._models["tiny-drafter"] = tiny_model(2, noise_from=1, noise=0.01, max_positions=1024, kv_dtype=kv_dtype)
    engine._embedder = HashEmbedder()  # type: ignore[assignment]
    assert engine.target.model.new_cache(1).quantized == (kv_dtype is not None)  # the form really runs
    return engine


def add(engine: Engine, index: HybridIndex, tmp_path: Path, names: list[str]) -> None:
    for name in names:
        index.add_file(write(tmp_path / name, " ".join([TOPICS[name]] * 3)))
        time.sleep(0.01)  # distinct ingest times
    engine.prepare(index)


@pytest.fixture
def engine(tmp_path: Path, request: pytest.FixtureRequest) -> Engine:
    """An engine on fp32 KV, or (indirect parametrization) on the KV form given."""
    return make_engine(tmp_path / "home", getattr(request, "param", None))


KV_FORMS = pytest.mark.parametrize("engine", [None, kv_quant.STORAGE], ids=["kv-fp32", "kv8"], indirect=True)


@pytest.fixture
def index(engine: Engine, tmp_path: Path) -> Iterator[HybridIndex]:
    opened = engine.open_index(tmp_path / "index")
    add(engine, opened, tmp_path, list(TOPICS))
    yield opened
    opened.close()


@pytest.fixture
def prefills(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """(tokens restored from the cache, prefix length) of every document prefill the engine runs."""
    seen: list[tuple[int, int]] = []
    real = documents.prefill_parts

    def spy(model, prefix, cuts, cache, progress=None, run=None):  # type: ignore[no-untyped-def]
        seen.append((cache.length, len(prefix)))
        return real(model, prefix, cuts, cache, progress, run)

    monkeypatch.setattr(documents, "prefill_parts", spy)
    return seen


def window_of(engine: Engine, index: HybridIndex, source: str) -> int:
    return next(w.number for w in engine.windows(index) for p in w.parts if p.source == source)


def cached(engine: Engine, index: HybridIndex) -> list[bool]:
    return [engine.prefix_cache.contains(engine.target.model, p.prefix) for p in engine.document_prompts(index)]


def test_prepare_prefills_every_window_once(engine: Engine, index: HybridIndex, prefills) -> None:
    windows = engine.windows(index)
    assert len(windows) >= 3 and all(w.tokens <= engine.window_capacity() for w in windows)
    assert all(part.whole for w in windows for part in w.parts)  # small documents are never cut
    assert cached(engine, index) == [True] * len(windows)
    assert engine.prefill_documents(index) == 0.0 and prefills == []
    assert engine.reading_parts(index) == [w.label() for w in windows]  # the UI's document list names them


@pytest.mark.parametrize("source", list(QUESTIONS))
def test_a_question_reads_the_window_holding_its_evidence(engine: Engine, index: HybridIndex, source: str,
                                                          prefills) -> None:
    number = window_of(engine, index, source)
    contexts, long_prompt, _ = engine.prompts(QUESTIONS[source], index, DECODING)
    assert contexts.reading is not None and contexts.reading.window == number
    window = engine.windows(index)[number - 1]
    assert long_prompt.prefix == engine.target.prompt(window.pieces, "?").prefix
    events = list(engine.answer(QUESTIONS[source], index, DECODING))
    sources = next(e for e in events if isinstance(e, Sources))
    done = events[-1]
    assert isinstance(done, Done) and sources.reading == done.reading == contexts.reading
    assert done.citations[0].source == source and done.citations[0].read
    assert done.stats.prefix_cached_tokens == len(long_prompt.prefix)  # prefilled at ingest: a cache hit
    assert prefills == []
    # Said wherever the answer is shown: what the target read, and evidence it did not read.
    record = done_record(done)["read"]
    assert record["part"] == number and record["parts"] == len(engine.windows(index))
    assert record["label"] == window.label() and source in record["label"]
    assert [s["read_by_target"] for s in done_record(done)["sources"]] == [c.read for c in done.citations]
    text = summary_text(done)
    assert f"The target read {window.label()} (part {number} of {record['parts']})" in text
    if record["retrieved_elsewhere"]:
        assert "lie in parts not read" in text and "(not read by the target)" in text


def test_follow_up_questions_reuse_their_windows(tmp_path: Path, prefills) -> None:
    engine = make_engine(tmp_path / "home")
    index = engine.open_index(tmp_path / "index")
    for name in TOPICS:
        index.add_file(write(tmp_path / name, " ".join([TOPICS[name]] * 3)))
    # No prepare: the first question prefills its own window (only), the second finds it cached.
    first = answer_once(engine, QUESTIONS["orchid.txt"], index, DECODING)
    assert len(prefills) == 1
    second = answer_once(engine, "Which insects visit orchids for pollinia?", index, DECODING)
    assert first.reading is not None and second.reading is not None
    assert first.reading.window == second.reading.window == window_of(engine, index, "orchid.txt")
    assert len(prefills) == 1  # the follow-up computed no document KV
    prefix = engine.document_prompts(index)[first.reading.window - 1].prefix
    assert second.stats.prefix_cached_tokens == len(prefix)
    assert 0 < second.stats.first_token_s < second.stats.question_to_first_s <= second.stats.answer_s
    assert cached(engine, index).count(True) == 1
    index.close()


def test_windows_kept_in_memory_answer_without_reading_the_disk(engine: Engine, index: HybridIndex,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    windows = engine.windows(index)
    assert engine.keep_windows_in_memory(index) == len(windows)

    def no_disk(*_: object) -> None:
        raise AssertionError("a window's KV was read from disk")

    monkeypatch.setattr(engine.prefix_cache.store, "read", no_disk)
    for source in ("volcano.txt", "orchid.txt", "volcano.txt"):  # two windows, and back
        done = answer_once(engine, QUESTIONS[source], index, DECODING)
        assert done.reading is not None and done.reading.window == window_of(engine, index, source)
        assert done.stats.prefix_cached_tokens > 0
    # Over the budget, nothing is loaded ahead and the recency rule stays as it was.
    engine.settings = replace(engine.settings, hot_windows_gb=0.0)
    assert engine.keep_windows_in_memory(index) == 1


def test_adding_a_document_touches_only_the_last_window(engine: Engine, index: HybridIndex, tmp_path: Path,
                                                        prefills) -> None:
    before = engine.windows(index)
    TOPICS["reef.txt"] = "Coral reefs grow where warm shallow water lets algae feed the polyps."
    try:
        add(engine, index, tmp_path, ["reef.txt"])
    finally:
        del TOPICS["reef.txt"]
    after = engine.windows(index)
    assert after[: len(before) - 1] == before[:-1]
    assert cached(engine, index) == [True] * len(after)
    if len(after) == len(before):  # the last window grew: only the new document was computed
        old_prefix = engine.target.prompt(before[-1].pieces, "?").prefix
        assert prefills == [(len(old_prefix), len(engine.document_prompts(index)[-1].prefix))]
    else:  # a new window: computed after its header only
        assert len(prefills) == 1 and prefills[0][1] == len(engine.document_prompts(index)[-1].prefix)


def test_deleting_a_document_recomputes_from_its_window(engine: Engine, index: HybridIndex, prefills) -> None:
    before = engine.windows(index)
    changed = window_of(engine, index, "volcano.txt")
    assert 1 < changed < len(before)
    engine.delete(index, "volcano.txt")
    engine.prepare(index)
    after = engine.windows(index)
    assert after[: changed - 1] == before[: changed - 1]  # untouched, still cached, not recomputed
    assert cached(engine, index) == [True] * len(after)
    assert len(prefills) == len(after) - (changed - 1)
    window = before[changed - 1]
    kept = [p for p in window.parts[: [p.source for p in window.parts].index("volcano.txt")]]
    restored = len(engine.target.prompt([p.text for p in kept], "?").prefix)
    assert prefills[0][0] == restored  # the documents before the deleted one came from the cache
    answer = answer_once(engine, QUESTIONS["orchid.txt"], index, DECODING)
    assert answer.stats.prefix_cached_tokens > 0


@KV_FORMS
@pytest.mark.parametrize("method", ["rapid", "sd", "magicdec", "lookup", "rapid-focus"])
def test_speculative_methods_at_eta_0_return_lc_tokens_on_the_routed_window(engine: Engine, index: HybridIndex,
                                                                            method: str) -> None:
    question = QUESTIONS["volcano.txt"]
    lc = answer_once(engine, question, index, replace(DECODING, max_new_tokens=24))
    out = answer_once(engine, question, index, replace(DECODING, method=method, max_new_tokens=24,
                                                        magicdec_window=64))
    assert out.reading == lc.reading and lc.reading is not None and lc.reading.window > 1
    assert out.answer == lc.answer and out.stats.generated == lc.stats.generated
    assert out.stats.context_tokens == lc.stats.context_tokens
    if method in ("rapid", "sd", "rapid-focus"):
        assert out.stats.drafted > 0


@pytest.mark.parametrize("engine", [kv_quant.STORAGE], ids=["kv8"], indirect=True)
def test_8bit_windows_round_trip_their_bytes(engine: Engine, index: HybridIndex, tmp_path: Path) -> None:
    """Every window's stored 8-bit KV, read back from disk (and as held in memory), is the bytes a
    prefill of that window computes; the memory estimate for holding them counts 8-bit bytes."""
    model = engine.target.model
    prompts = engine.document_prompts(index)
    assert len(prompts) >= 3
    from_disk = PrefixCache(engine.settings.kv_cache_dir, engine._model_ids)
    for prompt in prompts:
        fresh = model.new_cache(len(prompt.prefix) + 1)
        prefill_parts(model, prompt.prefix, prompt.cuts(), fresh)
        for store in (from_disk, engine.prefix_cache):
            stored = store.load(model, prompt.prefix, len(prompt.prefix) + 1)
            assert stored is not None and stored.quantized
            for layer in range(model.args.n_layers):
                for mine, theirs in zip(stored.span(layer, 0, len(prompt.prefix)),
                                        fresh.span(layer, 0, len(prompt.prefix)), strict=True):
                    assert mine.dtype == kv_quant.STORAGE and torch.equal(mine, theirs)
    a = model.args
    per_token = 2 * a.n_layers * a.n_kv_heads * kv_quant.row_bytes(a.head_dim)
    assert engine.prefix_cache.bytes_per_1k_tokens(model) == 1000 * per_token
    tokens = sum(len(p.prefix) for p in prompts)
    engine.settings = replace(engine.settings, hot_windows_gb=tokens * per_token * 1.001 / 1e9)  # just enough
    assert engine.keep_windows_in_memory(index) == len(prompts)
    engine.settings = replace(engine.settings, hot_windows_gb=tokens * per_token * 0.999 / 1e9)
    assert engine.keep_windows_in_memory(index) == 1


def test_eval_rows_say_whether_the_window_read_held_the_labelled_page(engine: Engine, index: HybridIndex,
                                                                      tmp_path: Path) -> None:
    from app.eval.runner import method_runs, run_eval
    from app.eval.types import QAItem

    items = [QAItem("q1", QUESTIONS["volcano.txt"], ["lava"], page=None, source="volcano.txt"),
             QAItem("q2", QUESTIONS["orchid.txt"], ["pollinia"], page=None, source="orchid.txt")]
    runs = method_runs(["lc", "rapid"], DECODING)
    results = run_eval(engine, index, items, runs, engine.settings, warmup=True, out=tmp_path,
                       log=lambda _: None, documents=list(TOPICS), argv=[])
    assert results["complete"] and len(results["rows"]) == 4
    for row in results["rows"]:
        assert row["read"] is not None and row["source"] in row["read"]
        assert row["page_retrieved"] is None and row["page_read"] is None  # text files have no pages
    lc, rapid = results["rows"][:2]
    assert lc["answer"] == rapid["answer"]  # eta = 0 on the routed window
