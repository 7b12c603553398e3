"""Every prompt fits the window of each model that reads it: the RAG budget is capped, and a prompt
too long for its reader (target or drafter) is refused before any token, with the token counts."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.config import Limits, ModelSettings, Settings
from app.pipeline import Engine, answer_once
from decoding.generate import generate
from decoding.settings import DecodingSettings
from retrieval.errors import ContextTooLongError
from retrieval.index import HybridIndex
from retrieval.types import RetrievalSettings
from tests.retrieval_fixtures import HashEmbedder, write
from tests.test_windows_engine import QUESTIONS, TOPICS
from tests.tiny import random_prompt, tiny_model

DECODING = DecodingSettings(method="rag", max_new_tokens=12, gamma=4, eta=0.0)
ROOM = DECODING.max_new_tokens + DECODING.gamma + 2


def make_engine(home: Path, drafter_positions: int) -> Engine:
    # budget_fraction 1: the budget is the whole corpus, as |C|/24 is for a corpus 24 windows long.
    settings = Settings(
        home=home, models=ModelSettings(target="tiny-target", drafter="tiny-drafter"),
        retrieval=RetrievalSettings(chunk_tokens=64, budget_min_tokens=150, budget_fraction=1.0),
        decoding=DECODING, limits=Limits(max_new_tokens=32),
    )
    engine = Engine(settings, log=lambda _: None)
    engine._models["tiny-target"] = tiny_model(1, max_positions=1024)
    engine._models["tiny-drafter"] = tiny_model(2, noise_from=1, noise=0.01, max_positions=drafter_positions)
    engine._embedder = HashEmbedder()  # type: ignore[assignment]
    return engine


@pytest.fixture
def engine(tmp_path: Path) -> Engine:
    return make_engine(tmp_path / "home", drafter_positions=512)


@pytest.fixture
def index(engine: Engine, tmp_path: Path) -> Iterator[HybridIndex]:
    opened = engine.open_index(tmp_path / "index")
    for name, text in TOPICS.items():
        opened.add_file(write(tmp_path / name, " ".join([text] * 3)))
        time.sleep(0.01)  # distinct ingest times
    yield opened
    opened.close()


def test_the_rag_budget_is_capped_at_the_targets_window(engine: Engine, index: HybridIndex) -> None:
    assert len(engine.windows(index)) > 1  # the corpus is larger than the target's window
    contexts, _, rag_prompt = engine.prompts(QUESTIONS["orchid.txt"], index, DECODING)
    assert len(rag_prompt) + ROOM <= engine.target.max_positions
    assert contexts.rag_chunk_ids  # the best chunks that fit, never none


def test_the_rag_budget_is_capped_at_the_drafters_window(engine: Engine, index: HybridIndex) -> None:
    decoding = DecodingSettings(method="rapid", max_new_tokens=12, gamma=4, eta=0.0)
    _, long_prompt, rag_prompt = engine.prompts(QUESTIONS["orchid.txt"], index, decoding)
    assert len(rag_prompt) + ROOM <= engine.draft_model.max_positions == 512
    assert len(long_prompt) + ROOM > 512  # the target's window reads more


def test_a_long_prompt_past_the_drafters_window_is_refused(engine: Engine, index: HybridIndex) -> None:
    decoding = DecodingSettings(method="sd", max_new_tokens=12, gamma=4, eta=0.0)
    with pytest.raises(ContextTooLongError, match=r"tiny-2 reads at most 512") as caught:
        answer_once(engine, QUESTIONS["orchid.txt"], index, decoding)
    assert "The documents and question: " in str(caught.value)


def test_generate_refuses_a_prompt_past_the_targets_window() -> None:
    target = tiny_model(1, max_positions=128)
    with pytest.raises(ValueError, match=r"The prompt: 200 tokens, .* tiny-1 reads at most 128"):
        next(generate("lc", target, None, random_prompt(200, seed=3), None, DecodingSettings(max_new_tokens=8)))


@pytest.mark.parametrize("method", ["sd", "rapid"])
def test_generate_refuses_a_drafter_prompt_past_the_drafters_window(method: str) -> None:
    target, drafter = tiny_model(1), tiny_model(2, noise_from=1, noise=0.01, max_positions=128)
    prompt = random_prompt(200, seed=3)
    with pytest.raises(ValueError, match=r"The drafter's prompt: 200 tokens, .* tiny-2 reads at most 128"):
        next(generate(method, target, drafter, prompt, prompt, DecodingSettings(max_new_tokens=8)))
