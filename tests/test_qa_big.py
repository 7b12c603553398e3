"""data/qa_big.jsonl: questions over R-data + R-intro + R-admin together, each answer on its page."""

from __future__ import annotations

import json

import pytest

from tests.retrieval_fixtures import REPO

QA_BIG = REPO / "data" / "qa_big.jsonl"
PAGES = {"R-data.pdf": 41, "R-intro.pdf": 113, "R-admin.pdf": 85}


@pytest.fixture(scope="module")
def items() -> list[dict]:
    return [json.loads(line) for line in QA_BIG.read_text().splitlines() if line.strip()]


def test_questions_are_spread_over_the_three_manuals_and_their_pages(items: list[dict]) -> None:
    assert len(items) >= 24 and len({item["id"] for item in items}) == len(items)
    for item in items:
        assert set(item) == {"id", "question", "answers", "page", "position", "source"}
    for source, n_pages in PAGES.items():
        pages = [item["page"] for item in items if item["source"] == source]
        assert len(pages) >= 8, source
        assert min(pages) <= n_pages / 3 and max(pages) > 2 * n_pages / 3  # beginning and end
        assert any(n_pages / 3 < p <= 2 * n_pages / 3 for p in pages)  # and middle


def test_every_answer_is_verbatim_on_its_page(items: list[dict]) -> None:
    import pypdf

    text = {source: [page.extract_text() for page in pypdf.PdfReader(REPO / "data" / source).pages]
            for source in PAGES}
    for source, n_pages in PAGES.items():
        assert len(text[source]) == n_pages
    for item in items:
        page = text[item["source"]][item["page"] - 1]
        for answer in item["answers"]:
            assert answer in page, item
            assert answer.lower() not in item["question"].lower(), item  # not given away
