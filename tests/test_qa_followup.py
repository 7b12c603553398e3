"""data/qa_followup.jsonl: two-turn conversations over R-data.pdf whose follow-ups mean nothing alone;
and a follow-up whose page retrieval finds only through the drafter's rewrite (real models)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from app.eval.conversations import ConversationItem, load_conversations, page_found
from tests.retrieval_fixtures import R_DATA, REPO

QA_FOLLOWUP = REPO / "data" / "qa_followup.jsonl"


@pytest.fixture(scope="module")
def items() -> list[ConversationItem]:
    return load_conversations(QA_FOLLOWUP)


def test_conversations_have_two_turns_and_labelled_pages(items: list[ConversationItem]) -> None:
    records = [json.loads(line) for line in QA_FOLLOWUP.read_text().splitlines() if line.strip()]
    assert len(items) >= 16 and len({item.id for item in items}) == len(items)
    for record in records:
        assert set(record) == {"id", "history", "question", "standalone", "answers", "page"}
    for item in items:
        assert len(item.history) == 1 and item.question != item.standalone


def test_every_answer_is_verbatim_on_its_page_and_not_given_away(items: list[ConversationItem]) -> None:
    import pypdf

    pages = [page.extract_text() for page in pypdf.PdfReader(R_DATA).pages]
    for item in items:
        for answer in item.answers:
            assert answer in pages[item.page - 1], item
            given = [item.question, item.standalone, item.history[0].question, item.history[0].answer]
            assert all(answer.lower() not in text.lower() for text in given), item


@pytest.mark.real_models
def test_a_follow_up_finds_its_page_only_through_the_rewrite(tmp_path: Path) -> None:
    """"Who took it over from them?" after a question on dBase retrieves other pages as written; the
    drafter's rewrite names what "it" and "them" stand for, and the page (28: "written by Ashton-Tate
    and later owned by Borland") is among the top 5."""
    from app.config import ModelSettings, Settings
    from app.conversation import Turn
    from app.pipeline import Engine
    from tests.ui_helpers import small_model

    model = str(small_model())
    engine = Engine(Settings(home=tmp_path / "home", models=ModelSettings(target=model, drafter=model)),
                    log=lambda _: None)
    index = engine.open_index(tmp_path / "index")
    index.add_files([R_DATA], progress=False)
    item = ConversationItem("dbase-owner", (Turn("Which company originally wrote the dBase program?", "Ashton-Tate."),),
                            "Who took it over from them?", "Which company later owned dBase?", ["Borland"], 28)
    rewritten = engine.standalone_question(item.question, item.history)
    assert "dBase" in rewritten or "Ashton-Tate" in rewritten, rewritten
    assert not page_found(index, item.question, item)
    assert page_found(index, rewritten, item)
