"""Chunk KV end to end on the real default pair: built at ingest, served to RAPID's drafter, exact."""

from __future__ import annotations

from pathlib import Path

import pytest

import app.chunk_kv as chunk_kv_module
from app.config import ModelSettings, Settings
from app.pipeline import Engine, answer_once
from decoding.settings import DecodingSettings
from retrieval.types import RetrievalSettings
from tests.docs import pdf_excerpt

pytestmark = pytest.mark.real_models
QUESTION = "Which R function reads files in fixed width format, and what does it need to be told?"


def test_rapid_on_chunk_kv_returns_lc_answers(tmp_path: Path, large_model_dir: Path, small_model_dir: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    settings = Settings(
        home=tmp_path / "home",
        models=ModelSettings(target=str(large_model_dir), drafter=str(small_model_dir)),
        # A budget under the corpus size, so the drafter reads a retrieved subset.
        retrieval=RetrievalSettings(chunk_tokens=256, budget_min_tokens=600, similarity_floor=0.0),
        decoding=DecodingSettings(method="rapid", max_new_tokens=32, gamma=5, eta=0.0),
    )
    engine = Engine(settings, log=lambda message: None)
    index = engine.open_index(tmp_path / "index")
    engine.ingest(index, [pdf_excerpt([14, 15, 16, 17], tmp_path / "excerpt.pdf")], progress=False)
    chunks = [chunk for doc in index.documents() for chunk in index.chunks(doc.doc_id)]
    stored = list((index.directory / "chunk_kv").glob("*/*.safetensors"))
    assert len(stored) == len(chunks) > 3  # every chunk encoded at ingest

    assembled: list[int] = []
    real_assemble = chunk_kv_module.assemble

    def counting_assemble(model, pieces, capacity):
        assembled.append(len(pieces))
        return real_assemble(model, pieces, capacity)

    monkeypatch.setattr(chunk_kv_module, "assemble", counting_assemble)
    lc = answer_once(engine, QUESTION, index, DecodingSettings(method="lc", max_new_tokens=32))
    rapid = answer_once(engine, QUESTION, index, settings.decoding)
    assert rapid.answer == lc.answer
    assert rapid.stats.generated == lc.stats.generated > 5
    assert rapid.stats.drafted > 0 and rapid.stats.accepted > 0
    assert len(assembled) == 1 and 1 < assembled[0] - 1 < len(chunks)  # header + a retrieved subset
    assert rapid.stats.draft_context_tokens < lc.stats.context_tokens

    assert engine.delete(index, "excerpt.pdf")
    assert not list((index.directory / "chunk_kv").glob("*/*.safetensors"))
