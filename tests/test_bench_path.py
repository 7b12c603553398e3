"""bench.decode times the product's own path: every method answers through the pipeline's entry
(Engine.answer, as the CLI calls it), so RAPID's drafter reads its passages from chunk KV."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import app.chunk_kv as chunk_kv
from app.pipeline import Engine
from bench.decode import bench_methods, method_variant
from decoding.settings import DecodingSettings
from retrieval.index import HybridIndex
from tests.retrieval_fixtures import write
from tests.tiny_engine import tiny_engine

DOCUMENTS = {
    "alpaca.txt": "Alpacas are shorn in spring and their fleece is spun into yarn by the weavers of Cusco.",
    "glacier.txt": "Glaciers grind valleys into a U shape as the ice flows downhill past moraines.",
    "volcano.txt": "Basalt lava from shield volcanoes is runny and spreads over wide plains of rock.",
    "comet.txt": "Comets grow bright tails of dust and gas when they swing close to the sun.",
}
QUESTION = "Who spins alpaca fleece into yarn?"
DECODING = DecodingSettings(method="lc", max_new_tokens=12, gamma=4, eta=0.0)
METHODS = ["lc", "rapid", "rapid+lookup", "rapid+all-tokens"]
RUNS = 2


@pytest.fixture
def engine(tmp_path: Path) -> Engine:
    return tiny_engine(tmp_path / "home", DECODING)


@pytest.fixture
def index(engine: Engine, tmp_path: Path) -> Iterator[HybridIndex]:
    opened = engine.open_index(tmp_path / "index")
    files = []
    for name, text in DOCUMENTS.items():
        files.append(write(tmp_path / name, " ".join([text] * 3)))
        time.sleep(0.01)  # distinct ingest times
    engine.ingest(opened, files, progress=False)  # what bench.decode's build_index does
    yield opened
    opened.close()


def test_every_method_answers_through_the_pipeline_and_rapid_reads_chunk_kv(
    engine: Engine, index: HybridIndex, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[DecodingSettings] = []
    real_answer = Engine.answer

    def answer(self, question, index, decoding=None, compare=False, retrieval=None, **rest):  # type: ignore[no-untyped-def]
        calls.append(decoding)
        return real_answer(self, question, index, decoding, compare, retrieval, **rest)

    assembled: list[int] = []
    real_assemble = chunk_kv.assemble

    def assemble(model, pieces, capacity):  # type: ignore[no-untyped-def]
        assembled.append(len(pieces))
        return real_assemble(model, pieces, capacity)

    monkeypatch.setattr(Engine, "answer", answer)
    monkeypatch.setattr(chunk_kv, "assemble", assemble)
    rows, lc = bench_methods({"q8": engine}, {"q8": index}, QUESTION, DECODING, METHODS, RUNS)["q8"]

    # Every run of every method is one call of the pipeline's entry, with the variant's settings.
    assert calls == [method_variant(m, DECODING)[1] for m in METHODS for _ in range(RUNS)]
    assert calls[2 * RUNS].lookup_in_rapid and not calls[3 * RUNS].draft_vocabulary
    # Each RAPID run's drafter read its passages from chunk KV (the header and at least one passage).
    rapid_runs = RUNS * sum(m.startswith("rapid") for m in METHODS)
    assert len(assembled) == rapid_runs and all(n >= 2 for n in assembled)
    # The peers' prompt is the one the pipeline built; every method returned LC's tokens.
    assert lc.long_prompt_tokens and len(lc.rag_prompt_tokens) < len(lc.long_prompt_tokens)
    assert rows["lc"]["context_tokens"] == len(lc.long_prompt_tokens)
    assert rows["lc"]["prefix_cached_tokens"] > 0  # the documents' KV from the ingest, as in the product
    for method in METHODS:
        assert rows[method]["same_tokens_as_lc"], method
        assert rows[method]["generated"] and rows[method]["decode_tokens_per_s"] is not None
    for method in METHODS[1:]:
        assert rows[method]["draft_context_tokens"] == len(lc.rag_prompt_tokens), method
