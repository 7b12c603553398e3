"""data/qaset.jsonl: the labelled set split by document into tune and report halves.

Every answer is checked verbatim on its labelled page (PDF) or section (HTML, Markdown, DOCX) as
the project's own readers extract it, so a question is answerable from what the app indexes.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from app.eval.runner import SPLITS, load_questions, select_split
from app.eval.scoring import contains_answer
from retrieval.readers import PAGE_SEPARATOR, read_document
from retrieval.types import Page

REPO = Path(__file__).resolve().parent.parent
QASET = REPO / "data" / "qaset.jsonl"
FIELDS = {"id", "question", "answers", "source", "position", "hops", "split"}
MAX_ANSWER_WORDS = 8


def document_path(source: str) -> Path:
    """R-data.pdf is shared with the older sets in data/; the other documents live in data/qaset/."""
    shared = REPO / "data" / source
    return shared if shared.exists() else REPO / "data" / "qaset" / source


@pytest.fixture(scope="module")
def records() -> list[dict]:
    return [json.loads(line) for line in QASET.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.fixture(scope="module")
def documents(records: list[dict]) -> dict[str, list[Page]]:
    return {source: read_document(document_path(source), 10**8) for source in {r["source"] for r in records}}


def locate(pages: list[Page], label: dict) -> Page:
    """The one page or section a label names; a section title that repeats is no label."""
    if "page" in label:
        found = [p for p in pages if p.page == label["page"]]
    else:
        found = [p for p in pages if p.section == label["section"]]
    assert len(found) == 1, f"{label} names {len(found)} places"
    return found[0]


def third(pages: list[Page], page: Page, answer: str) -> str:
    total = sum(len(p.text) for p in pages) + len(PAGE_SEPARATOR) * (len(pages) - 1)
    fraction = (page.char_start + page.text.index(answer)) / total
    return "beginning" if fraction < 1 / 3 else "middle" if fraction < 2 / 3 else "end"


def test_set_size_fields_and_documents(records: list[dict]) -> None:
    assert len(records) >= 200
    assert len({r["id"] for r in records}) == len(records), "ids must be unique"
    for r in records:
        assert set(r) >= FIELDS and ("page" in r) != ("section" in r), r["id"]
        assert set(r) - FIELDS - {"page", "section"} <= {"support"}, r["id"]
        assert r["hops"] in (1, 2) and (r["hops"] == 2) == ("support" in r), r["id"]
        assert r["question"].strip().endswith("?"), r["id"]
    sources = {r["source"] for r in records}
    assert len(sources) >= 6
    assert {document_path(s).suffix for s in sources} >= {".pdf", ".html", ".md", ".docx"}
    assert all(document_path(s).exists() for s in sources)
    assert sum(r["hops"] == 2 for r in records) >= 20  # questions needing two places in a document


def test_split_is_by_document_and_both_halves_mix_kinds(records: list[dict]) -> None:
    splits = defaultdict(set)
    for r in records:
        splits[r["source"]].add(r["split"])
    assert all(len(s) == 1 for s in splits.values()), "a document's questions must all be in one half"
    halves = Counter(next(iter(s)) for s in splits.values())
    assert set(halves) == set(SPLITS)
    for half in SPLITS:
        kinds = {document_path(source).suffix for source, s in splits.items() if half in s}
        assert len(kinds) >= 3, (half, kinds)
        assert sum(r["split"] == half for r in records) >= 100, half
        assert any(r["hops"] == 2 for r in records if r["split"] == half), half


def test_every_answer_is_verbatim_on_its_labelled_page_or_section(
    records: list[dict], documents: dict[str, list[Page]]
) -> None:
    for r in records:
        pages = documents[r["source"]]
        place = locate(pages, r)
        for answer in r["answers"]:
            assert answer in place.text, f"{r['id']}: {answer!r} is not in {r.get('page') or r.get('section')!r}"
        assert min(len(a.split()) for a in r["answers"]) <= MAX_ANSWER_WORDS, r["id"]
        assert not contains_answer(r["question"], r["answers"]), f"{r['id']}: the question gives the answer away"
        assert r["position"] == third(pages, place, r["answers"][0]), r["id"]


def test_two_hop_questions_name_their_second_place(records: list[dict], documents: dict[str, list[Page]]) -> None:
    for r in records:
        if r["hops"] != 2:
            continue
        support = r["support"]
        place = locate(documents[r["source"]], support)
        assert place is not locate(documents[r["source"]], r), f"{r['id']}: the second place is the first"
        # Whitespace-insensitive: the supporting sentence may wrap across extracted lines.
        assert " ".join(support["text"].split()) in " ".join(place.text.split()), r["id"]


def test_eval_loads_the_set_and_selects_each_half(records: list[dict]) -> None:
    items = load_questions(QASET)
    assert len(items) == len(records)
    halves = {half: select_split(items, half, QASET) for half in SPLITS}
    assert sum(len(h) for h in halves.values()) == len(items)
    assert not {i.source for i in halves["tune"]} & {i.source for i in halves["report"]}
    assert all(i.section or i.page for i in items)
