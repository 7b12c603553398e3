"""build_contexts: the long context (whole, ordered, never cut) and the budgeted RAG context."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from retrieval.context import best_sentences, build_contexts, excerpt, rag_budget, select_chunks
from retrieval.errors import ContextTooLongError, EmptyIndexError
from retrieval.index import HybridIndex
from retrieval.types import Chunk, RetrievalSettings, ScoredChunk
from tests.retrieval_fixtures import HashEmbedder, text_pdf, word_tokens, write

TOPICS = {
    "alpaca.txt": "Alpacas are shorn in spring and their fleece is spun into yarn. ",
    "glacier.md": "Glaciers grind valleys into a U shape as the ice flows downhill. ",
    "volcano.txt": "Basalt lava from shield volcanoes is runny and spreads over wide plains. ",
}


def settings(**changes: object) -> RetrievalSettings:
    base: dict[str, object] = {"chunk_tokens": 40, "budget_min_tokens": 60, "budget_fraction": 0.0}
    return RetrievalSettings(**{**base, **changes})  # type: ignore[arg-type]


@pytest.fixture
def index(tmp_path: Path) -> Iterator[HybridIndex]:
    with HybridIndex(tmp_path / "index", settings(), word_tokens, HashEmbedder()) as opened:  # type: ignore[arg-type]
        for name, sentence in TOPICS.items():
            heading = "# Ice\n" if name.endswith(".md") else ""
            opened.add_file(write(tmp_path / name, heading + "".join(f"{sentence}Note {i}. " for i in range(6))))
        yield opened


def test_empty_index(tmp_path: Path) -> None:
    with (
        HybridIndex(tmp_path / "i", settings(), word_tokens, HashEmbedder()) as empty,  # type: ignore[arg-type]
        pytest.raises(EmptyIndexError, match=r"^No documents are indexed yet: add documents first\.$"),
    ):
        build_contexts(empty, "anything", settings(), word_tokens, 10_000)


def test_long_context_is_every_document_whole_in_order(index: HybridIndex) -> None:
    contexts = build_contexts(index, "alpaca fleece", settings(), word_tokens, 100_000)
    expected = "\n\n".join(
        f"### Document: {doc.source}\n{index.document_text(doc.doc_id)}" for doc in index.documents()
    )
    assert contexts.long_context == expected
    assert [d.source for d in index.documents()] == sorted(TOPICS)
    assert contexts.long_tokens == len(word_tokens(expected))


def test_too_long_raises_with_the_exact_counts(index: HybridIndex) -> None:
    tokens = build_contexts(index, "q", settings(), word_tokens, 100_000).long_tokens
    assert build_contexts(index, "q", settings(), word_tokens, tokens).long_tokens == tokens  # exactly fits
    with pytest.raises(ContextTooLongError) as caught:
        build_contexts(index, "q", settings(), word_tokens, tokens - 1)
    message = str(caught.value)
    assert f"{tokens:,} tokens" in message and f"holds {tokens - 1:,}" in message
    assert "\n" not in message


def test_rag_context_keeps_the_best_chunks_within_budget_in_document_order(index: HybridIndex) -> None:
    contexts = build_contexts(index, "glaciers grind valleys", settings(budget_min_tokens=100), word_tokens, 10**5)
    assert contexts.long_tokens > 100  # the budget is smaller than the corpus
    assert contexts.citations and contexts.citations[0].source == "glacier.md"
    assert contexts.citations[0].section == "Ice" and contexts.citations[0].label() == "glacier.md, Ice"
    scores = [c.score for c in contexts.citations]
    assert scores == sorted(scores, reverse=True)
    assert contexts.rag_tokens == len(word_tokens(contexts.rag_context)) <= 100
    blocks = [block.split("\n", 1) for block in contexts.rag_context.split("\n\n")]
    assert len(blocks) == len(contexts.citations) > 1
    assert all(header.startswith("[") and header.endswith("]") for header, _ in blocks)
    # Document order (sources sorted, chunks by position), whatever their scores were.
    positions = [contexts.long_context.index(text) for _, text in blocks]
    assert positions == sorted(positions)
    question = "glaciers grind valleys"
    assert {best_sentences(text, question) for _, text in blocks} == {c.excerpt for c in contexts.citations}


def test_small_corpus_gives_the_drafter_everything(index: HybridIndex) -> None:
    big_budget = settings(budget_min_tokens=100_000)
    contexts = build_contexts(index, "volcano lava", big_budget, word_tokens, 100_000)
    every_chunk = [c for d in index.documents() for c in index.chunks(d.doc_id)]
    assert contexts.rag_context == "\n\n".join(f"[{c.label()}]\n{c.text}" for c in every_chunk)
    assert contexts.citations[0].source == "volcano.txt"


def test_deleted_document_leaves_both_contexts(index: HybridIndex) -> None:
    index.delete("volcano.txt")
    contexts = build_contexts(index, "basalt lava volcanoes", settings(budget_min_tokens=100_000), word_tokens, 10**6)
    assert "volcano" not in contexts.long_context.lower()
    assert "volcano" not in contexts.rag_context.lower()
    assert all(c.source != "volcano.txt" for c in contexts.citations)


def test_pdf_headers_and_citations_name_the_page(tmp_path: Path) -> None:
    pdf = write(tmp_path / "atlas.pdf", text_pdf(["Deserts are dry and hot.", "Tundra soil stays frozen."]))
    with HybridIndex(tmp_path / "i", settings(), word_tokens, HashEmbedder()) as index:  # type: ignore[arg-type]
        index.add_file(pdf)
        contexts = build_contexts(index, "frozen tundra soil", settings(), word_tokens, 10_000)
    assert contexts.citations[0].page == 2 and contexts.citations[0].label() == "atlas.pdf, p. 2"
    assert "[atlas.pdf, p. 2]\nTundra soil stays frozen." in contexts.rag_context


def test_budget_rule() -> None:
    assert rag_budget(1000, RetrievalSettings(budget_min_tokens=2048, budget_fraction=1 / 24)) == 2048
    assert rag_budget(240_000, RetrievalSettings(budget_min_tokens=2048, budget_fraction=1 / 24)) == 10_000


def test_select_chunks_skips_what_does_not_fit_and_keeps_at_least_one() -> None:
    def hit(order: int, tokens: int) -> ScoredChunk:
        chunk = Chunk(f"c{order}", "d", "s", order, "t", None, None, 0, 1, tokens)
        return ScoredChunk(chunk, 1.0 / (order + 1), None, None)

    hits = [hit(0, 50), hit(1, 80), hit(2, 30), hit(3, 30)]
    assert [h.chunk.order for h in select_chunks(hits, 100)] == [0, 2]
    assert [h.chunk.order for h in select_chunks(hits[1:], 10)] == [1]


def test_excerpt_is_short_and_single_spaced() -> None:
    text = "word  \n\t" * 200
    short = excerpt(text)
    assert len(short) <= 301 and "  " not in short and "\n" not in short and short.endswith("…")
    assert excerpt("  a\n b  ") == "a b"


CHUNK = ("R has many ways to import data. The function read.fwf reads fixed-width files; it needs the widths "
         "of the\nfields. Spreadsheets are another matter. Excel files can be read with packages such as readxl. "
         "Nothing else is here.")


def test_excerpt_shows_the_sentences_that_match_the_question() -> None:
    shown = best_sentences(CHUNK, "Which function reads a fixed-width file?")
    assert shown.startswith("…The function read.fwf reads fixed-width files;") and shown.endswith(" …")
    assert "import data" not in shown and "Nothing else" not in shown
    both = best_sentences(CHUNK, "fixed-width files or Excel spreadsheets?")
    assert "read.fwf" in both and "Excel files" in both and " … " in both
    assert both.index("read.fwf") < both.index("Excel")  # document order, whatever the scores
    assert best_sentences(CHUNK, "zebra stripes") == excerpt(CHUNK)  # no match: the chunk's opening
    assert best_sentences(CHUNK, "Nothing else?") == "…Nothing else is here."  # the last sentence: no trailing …
    assert best_sentences(CHUNK, "Which function reads a fixed-width file?") == shown  # deterministic
    assert len(best_sentences("word " * 400, "word")) <= 301
