"""A corpus larger than the target's window: windows cut at document and page boundaries, routing."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from retrieval.context import build_contexts, long_documents
from retrieval.index import HybridIndex
from retrieval.types import Chunk, RetrievalSettings, ScoredChunk
from retrieval.windows import Part, Window, plan_windows, route
from tests.retrieval_fixtures import HashEmbedder, text_pdf, word_tokens, write

SETTINGS = RetrievalSettings(chunk_tokens=40, budget_min_tokens=60, budget_fraction=0.0)
TOPICS = {
    "alpaca.txt": "Alpacas are shorn in spring and their fleece is spun into yarn. ",
    "glacier.txt": "Glaciers grind valleys into a U shape as the ice flows downhill. ",
    "volcano.txt": "Basalt lava from shield volcanoes is runny and spreads over wide plains. ",
    "comet.txt": "Comets grow bright tails of dust and gas when they pass near the sun. ",
}
ATLAS_PAGES = [f"Atlas page {n}. " + f"The {word} region has {word} weather and {word} rivers. " * 6
               for n, word in enumerate(["desert", "tundra", "jungle", "steppe", "marsh", "coast"], start=1)]


def piece_tokens(piece: str) -> int:
    return len(word_tokens("\n\n" + piece))


def add(index: HybridIndex, tmp_path: Path, name: str) -> None:
    if name == "atlas.pdf":
        index.add_file(write(tmp_path / name, text_pdf(ATLAS_PAGES)))
    else:
        index.add_file(write(tmp_path / name, "".join(f"{TOPICS[name]}Note {i}. " for i in range(4))))
    time.sleep(0.01)  # distinct ingest times


@pytest.fixture
def index(tmp_path: Path) -> Iterator[HybridIndex]:
    with HybridIndex(tmp_path / "index", SETTINGS, word_tokens, HashEmbedder()) as opened:  # type: ignore[arg-type]
        for name in ("alpaca.txt", "glacier.txt", "atlas.pdf", "volcano.txt"):
            add(opened, tmp_path, name)
        yield opened


def doc_tokens(index: HybridIndex) -> list[int]:
    return [piece_tokens(piece) for piece in long_documents(index)]


def test_a_corpus_that_fits_is_one_window_of_todays_pieces(index: HybridIndex) -> None:
    windows = plan_windows(index, piece_tokens, sum(doc_tokens(index)))
    assert len(windows) == 1 and windows[0].pieces == long_documents(index)
    assert all(part.whole for part in windows[0].parts)
    contexts = build_contexts(index, "glaciers", SETTINGS, word_tokens, 10**6, windows)
    single = build_contexts(index, "glaciers", SETTINGS, word_tokens, 10**6)
    assert contexts == single and contexts.reading is None


def test_windows_cut_at_documents_then_pages_and_hold_every_word(index: HybridIndex) -> None:
    tokens = doc_tokens(index)
    capacity = max(tokens[0] + tokens[1], tokens[3]) + 5  # alpaca + glacier fit one window; atlas does not
    assert tokens[2] > capacity
    windows = plan_windows(index, piece_tokens, capacity)
    assert all(window.tokens <= capacity for window in windows) and len(windows) >= 3
    assert [part.source for part in windows[0].parts] == ["alpaca.txt", "glacier.txt"]
    assert all(part.whole for part in windows[0].parts)
    atlas = [part for window in windows for part in window.parts if part.source == "atlas.pdf"]
    assert len(atlas) >= 2 and not any(part.whole for part in atlas)
    # Cut between pages, in order, every page once; each part's header names its pages.
    pages = [(part.first_page, part.last_page) for part in atlas]
    assert pages[0][0] == 1 and pages[-1][1] == len(ATLAS_PAGES)
    assert all(b[0] == a[1] + 1 for a, b in itertools.pairwise(pages))
    for part in atlas:
        assert part.text.startswith(f"### Document: atlas.pdf, pages {part.first_page}-{part.last_page}\n")
        assert part.label() == f"pages {part.first_page}-{part.last_page} of atlas.pdf"
        for number in range(part.first_page, part.last_page + 1):  # type: ignore[operator]
            assert f"Atlas page {number}." in part.text
    words = [w for window in windows for piece in window.pieces for w in word_tokens(piece.split("\n", 1)[1])]
    assert words == [w for doc in index.documents(in_ingest_order=True)
                     for w in word_tokens(index.document_text(doc.doc_id))]
    assert windows[-1].parts[-1].source == "volcano.txt" and windows[-1].parts[-1].whole


def test_a_page_longer_than_a_window_is_cut_between_chunks(index: HybridIndex) -> None:
    capacity = 60  # less than one atlas page, more than one chunk (with their headers)
    windows = plan_windows(index, piece_tokens, capacity)
    assert all(window.tokens <= capacity for window in windows)
    atlas = [part for window in windows for part in window.parts if part.source == "atlas.pdf"]
    chunks = index.chunks(next(d.doc_id for d in index.documents() if d.source == "atlas.pdf"))
    assert [c for part in atlas for c in range(part.first_chunk, part.last_chunk + 1)] == [c.order for c in chunks]
    assert any(part.first_page == part.last_page == 1 for part in atlas[1:])  # page 1 spans two parts


@pytest.mark.parametrize("capacity", [60, 200, 10**6])  # cut between chunks, between pages, one window
def test_every_chunk_is_found_at_its_span_in_the_piece_holding_it(index: HybridIndex, capacity: int) -> None:
    """A focus drafter reads the target's slots of the retrieved chunks: their spans in the pieces must
    hold exactly their text, in whole and in cut documents."""
    windows = plan_windows(index, piece_tokens, capacity)
    for window in windows:
        for part in window.parts:
            held = [c for doc in index.documents() for c in index.chunks(doc.doc_id) if part.holds(c)]
            assert held
            for chunk in held:
                start, end = part.span(chunk)
                assert part.text[start:end] == chunk.text, (part.label(), chunk.order)
    contexts = build_contexts(index, "tundra region weather rivers", SETTINGS, word_tokens, 10**6, windows)
    assert contexts.passage_spans
    texts = {passage.split("\n", 1)[1] for passage in contexts.rag_passages}
    for piece, start, end in contexts.passage_spans:
        assert contexts.long_documents[piece][start:end] in texts


def test_adding_a_document_changes_only_the_last_window(index: HybridIndex, tmp_path: Path) -> None:
    capacity = max(doc_tokens(index)[0] + doc_tokens(index)[1], 80)
    before = plan_windows(index, piece_tokens, capacity)
    add(index, tmp_path, "comet.txt")
    after = plan_windows(index, piece_tokens, capacity)
    assert after[: len(before) - 1] == before[:-1]
    assert after[len(before) - 1].pieces[: len(before[-1].parts)] == before[-1].pieces
    assert after[-1].parts[-1].source == "comet.txt"


def test_deleting_a_document_keeps_the_windows_before_it(index: HybridIndex) -> None:
    capacity = max(doc_tokens(index)[0] + doc_tokens(index)[1], 80)
    before = plan_windows(index, piece_tokens, capacity)
    changed = next(w.number for w in before if any(p.source == "volcano.txt" for p in w.parts))
    index.delete("volcano.txt")
    after = plan_windows(index, piece_tokens, capacity)
    assert after[: changed - 1] == before[: changed - 1]
    assert all(p.source != "volcano.txt" for w in after for p in w.parts)


def test_a_question_reads_the_window_holding_its_evidence(index: HybridIndex) -> None:
    capacity = max(doc_tokens(index)[0] + doc_tokens(index)[1], 80)
    windows = plan_windows(index, piece_tokens, capacity)
    for question, source in [("basalt lava shield volcanoes", "volcano.txt"),
                             ("alpacas shorn fleece yarn", "alpaca.txt"),
                             ("tundra region weather rivers", "atlas.pdf")]:
        contexts = build_contexts(index, question, SETTINGS, word_tokens, 10**6, windows)
        reading = contexts.reading
        assert reading is not None and reading.windows == len(windows)
        window = windows[reading.window - 1]
        assert contexts.long_documents == window.pieces
        assert any(part.source == source for part in window.parts)
        assert reading.label == window.label() and source in reading.note()
        assert sum(e.retrieved for e in reading.evidence) == reading.retrieved == len(contexts.citations)
        read = [c for c in contexts.citations if c.read]
        assert read and read[0].source == source
        if reading.elsewhere:
            assert "lie in parts not read" in reading.note()
            assert any(not c.read for c in contexts.citations)


def _window(number: int, doc_id: str) -> Window:
    return Window(number, (Part(doc_id, doc_id, 0, 9, None, None, True, doc_id),), 10)


def _hit(doc_id: str, score: float) -> ScoredChunk:
    return ScoredChunk(Chunk(f"{doc_id}-{score}", doc_id, doc_id, 0, "t", None, None, 0, 1, 1), score, None, None)


def test_routing_weighs_chunks_by_rank_and_ties_go_to_the_best_ranked_chunk() -> None:
    windows = [_window(1, "a"), _window(2, "b"), _window(3, "c")]
    # 1 against 1/2 + 1/3: the best chunk outweighs two weaker ones, whatever their fused scores ...
    assert route(windows, [_hit("a", 0.01), _hit("b", 0.03), _hit("b", 0.02)]).window.number == 1
    # ... but not four: 1/2 + 1/3 + 1/4 + 1/5 > 1.
    assert route(windows, [_hit("a", 0.5), *(_hit("b", 0.4 - i / 10) for i in range(4))]).window.number == 2
    tied = route(windows, [_hit("c", 0.4), _hit("a", 0.3), _hit("a", 0.2), _hit("b", 0.2), _hit("b", 0.1),
                           _hit("a", 0.1)])  # c: 1; a: 1/2 + 1/3 + 1/6 = 1 exactly
    assert tied.window.number == 3 and tied.elsewhere == 5
    assert [(e.part, e.retrieved, e.weight) for e in tied.evidence] == [(1, 3, 1.0), (2, 2, 0.25 + 0.2), (3, 1, 1.0)]
    assert route(windows, []).window.number == 1
