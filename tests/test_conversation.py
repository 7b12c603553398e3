"""Conversations: the history after the documents (cached prefix kept), the follow-up rewritten for
retrieval, the oldest exchanges cut with a note, and exactness at eta = 0 on a two-turn conversation
(tiny models, byte tokens; the real tokenizer's chat template where the model cache has it)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from app.config import Limits
from app.conversation import FollowUp, Turn, fit_history, pairs, rewrite_request, standalone_from
from app.events import Done, Sources
from app.pipeline import Engine, answer_once
from app.report import done_record, summary_text
from retrieval.index import HybridIndex
from tests.test_windows_engine import DECODING, QUESTIONS, TOPICS, add, make_engine

HISTORY = (Turn("Who spins alpaca fleece into yarn?", "The weavers of Cusco."),)
FOLLOW_UP = "And how does basalt lava spread?"


@pytest.fixture
def engine(tmp_path: Path) -> Engine:
    return make_engine(tmp_path / "home")


@pytest.fixture
def index(engine: Engine, tmp_path: Path) -> Iterator[HybridIndex]:
    opened = engine.open_index(tmp_path / "index")
    add(engine, opened, tmp_path, list(TOPICS))
    yield opened
    opened.close()


def test_history_follows_the_documents_and_keeps_their_prefix(engine: Engine) -> None:
    target = engine.target
    alone = target.prompt(["doc one", "doc two"], FOLLOW_UP)
    turn2 = target.prompt(["doc one", "doc two"], FOLLOW_UP, pairs(HISTORY))
    assert turn2.prefix == alone.prefix and turn2.boundaries == alone.boundaries
    tail = target.decode(turn2.suffix)
    assert tail.index(HISTORY[0].question) < tail.index(HISTORY[0].answer) < tail.index(FOLLOW_UP)
    assert tail.endswith(f"Question: {FOLLOW_UP}\nAnswer:")


def test_chat_template_puts_earlier_exchanges_as_turns() -> None:
    from transformers import AutoTokenizer

    from decoding.loaded_model import LoadedModel
    from tests.ui_helpers import small_model

    tokenizer = AutoTokenizer.from_pretrained(small_model())
    model = LoadedModel("0.5b", None, None, tokenizer, frozenset())  # type: ignore[arg-type]  # prompts only
    alone = model.prompt(["Some document."], FOLLOW_UP)
    turn2 = model.prompt(["Some document."], FOLLOW_UP, pairs(HISTORY))
    assert turn2.prefix == alone.prefix
    tail = tokenizer.decode(turn2.suffix)
    assert f"Question: {HISTORY[0].question}<|im_end|>\n<|im_start|>assistant\n{HISTORY[0].answer}<|im_end|>" in tail
    assert tail.endswith(f"<|im_start|>user\n{FOLLOW_UP}<|im_end|>\n<|im_start|>assistant\n")


def test_follow_up_is_retrieved_by_its_rewrite(engine: Engine, index: HybridIndex,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[tuple[str, tuple[Turn, ...]]] = []

    def rewrite(question: str, history: tuple[Turn, ...]) -> str:
        asked.append((question, tuple(history)))
        return QUESTIONS["volcano.txt"]

    monkeypatch.setattr(engine, "standalone_question", rewrite)
    follow_up = "And what about how it spreads?"
    events = list(engine.answer(follow_up, index, DECODING, history=HISTORY))
    assert asked == [(follow_up, HISTORY)]
    sources = next(e for e in events if isinstance(e, Sources))
    done = events[-1]
    assert isinstance(done, Done)
    assert sources.follow_up == done.follow_up == FollowUp(QUESTIONS["volcano.txt"], 1, 0)
    assert done.citations[0].source == "volcano.txt"
    record = done_record(done)["conversation"]
    assert record["standalone_question"] == QUESTIONS["volcano.txt"] and record["history_turns"] == 1
    assert f"Searched for: “{QUESTIONS['volcano.txt']}”" in summary_text(done)
    # A question that starts a conversation is not rewritten.
    assert answer_once(engine, QUESTIONS["orchid.txt"], index, DECODING).follow_up is None and len(asked) == 1


@pytest.mark.parametrize("method", ["rapid", "rapid-self", "sd", "magicdec", "lookup", "rapid-focus"])
def test_methods_at_eta_0_return_lc_tokens_for_a_conversation(engine: Engine, index: HybridIndex,
                                                              method: str) -> None:
    decoding = replace(DECODING, max_new_tokens=24)
    lc = answer_once(engine, FOLLOW_UP, index, decoding, history=HISTORY)
    out = answer_once(engine, FOLLOW_UP, index, replace(decoding, method=method, magicdec_window=64),
                      history=HISTORY)
    assert lc.follow_up is not None and out.follow_up == lc.follow_up and lc.follow_up.turns == 1
    assert out.answer == lc.answer and out.stats.generated == lc.stats.generated
    assert out.stats.context_tokens == lc.stats.context_tokens
    # The documents' prefix, prefilled at ingest, serves a follow-up as it serves a first question.
    assert out.stats.prefix_cached_tokens == lc.stats.prefix_cached_tokens > 0
    alone = answer_once(engine, FOLLOW_UP, index, decoding)
    assert lc.stats.context_tokens > alone.stats.context_tokens  # the history is in the prompt


def test_long_history_is_cut_from_the_oldest_and_said(engine: Engine, index: HybridIndex,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine, "standalone_question", lambda question, history: QUESTIONS["orchid.txt"])
    engine.settings = replace(engine.settings, limits=replace(engine.settings.limits, max_history_tokens=120))
    history = tuple(Turn(f"Question number {i} about the corpus?", f"Answer number {i}.") for i in range(6))
    _, long_prompt, rag_prompt, kept = engine.conversation_prompts(FOLLOW_UP, index, DECODING, history=history,
                                                                   query=QUESTIONS["orchid.txt"])
    assert 0 < len(kept) < len(history) and kept == history[-len(kept):]
    tail = engine.target.decode(long_prompt.suffix)
    assert "Question number 5" in tail and "Question number 0" not in tail
    assert rag_prompt.suffix == long_prompt.suffix  # the drafter reads the same conversation
    done = answer_once(engine, FOLLOW_UP, index, DECODING, history=history)
    assert done.follow_up is not None and done.follow_up.dropped == len(history) - len(kept)
    assert f"the {done.follow_up.dropped} oldest exchanges were left out" in done.follow_up.note()
    assert done_record(done)["conversation"]["history_dropped"] == done.follow_up.dropped


def test_fit_history_drops_the_oldest_first() -> None:
    history = [Turn("a", "1"), Turn("b", "22"), Turn("c", "333")]
    size = lambda turns: sum(len(t.question) + len(t.answer) for t in turns)  # noqa: E731
    assert fit_history(history, size, 100) == tuple(history)
    assert fit_history(history, size, 7) == tuple(history[1:])
    assert fit_history(history, size, 3) == ()
    assert Limits().max_history_tokens > 0


def test_rewrite_request_and_its_reply() -> None:
    request = rewrite_request(HISTORY, "and for DBF files?")
    assert HISTORY[0].question in request
    assert request.endswith("Last question: and for DBF files?\n\nStandalone question:")
    assert standalone_from(' "How do I read DBF files?"\nExtra line') == "How do I read DBF files?"
    assert standalone_from("Standalone question: How?") == "How?"
