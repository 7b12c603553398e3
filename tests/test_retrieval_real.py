"""The real thing: MiniLM embeddings over the two R manuals, labelled questions, page citations.

One index is built for the whole module (about half a minute on two CPU cores).
Run with -s to see the recall@5 figures.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from retrieval.chunking import chunk_pages
from retrieval.context import build_contexts
from retrieval.embedding import Embedder
from retrieval.index import HybridIndex
from retrieval.readers import read_document
from retrieval.recall import Label, load_labels, recall_at_k
from retrieval.types import RetrievalSettings
from tests.resources import SMALL, require_model
from tests.retrieval_fixtures import LABELS, R_DATA, R_FAQ, HashEmbedder, word_tokens

SETTINGS = RetrievalSettings()  # paper settings: 512-token chunks, similarity floor 0.3
MB = 1_000_000


def flat(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """On a small shared CPU, one torch thread embeds queries ~10x faster than two fighting for
    cores with another process; restored afterwards so other test modules are unaffected."""
    import torch  # a dependency: a missing torch is a broken install, never a skip
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def embedder(one_thread: None) -> Embedder:
    return Embedder()


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory: pytest.TempPathFactory, embedder: Embedder) -> Iterator[Path]:
    directory = tmp_path_factory.mktemp("real-index")
    with HybridIndex(directory, SETTINGS, word_tokens, embedder) as index:
        results = index.add_files([R_DATA, R_FAQ], progress=False)
        assert [r.status for r in results] == ["added", "added"], results
    yield directory


@pytest.fixture(scope="module")
def index(index_dir: Path, embedder: Embedder) -> Iterator[HybridIndex]:
    with HybridIndex(index_dir, SETTINGS, word_tokens, embedder) as opened:  # reopened: persistence
        yield opened


@pytest.fixture(scope="module")
def labels() -> list[Label]:
    return load_labels(LABELS)


@pytest.fixture(scope="module")
def reader_pages() -> dict[str, dict[int, str]]:
    return {
        path.name: {page.page or 0: page.text for page in read_document(path, 50 * MB)}
        for path in (R_DATA, R_FAQ)
    }


def test_labels_are_verbatim_on_their_page(labels: list[Label]) -> None:
    import pypdf

    raw = {path.name: [p.extract_text() for p in pypdf.PdfReader(path).pages] for path in (R_DATA, R_FAQ)}
    assert len(labels) >= 25
    for label in labels:
        pages_with_snippet = [i + 1 for i, text in enumerate(raw[label.source]) if label.answer_substring in text]
        assert pages_with_snippet == [label.page], label
        assert label.answer_substring.lower() not in label.question.lower()
    for source, n_pages in (("R-data.pdf", 41), ("R-FAQ.pdf", 52)):
        pages = [label.page for label in labels if label.source == source]
        assert min(pages) <= n_pages / 4 and max(pages) >= 3 * n_pages / 4  # beginning, middle and end
        assert any(n_pages / 3 <= p <= 2 * n_pages / 3 for p in pages)


def test_recall_at_5_hybrid_beats_each_side(index: HybridIndex, labels: list[Label]) -> None:
    recall = {mode: recall_at_k(index, labels, 5, mode) for mode in ("hybrid", "dense", "bm25")}
    print(f"\nrecall@5 over {len(labels)} labelled questions: "
          + "  ".join(f"{mode} {value:.3f}" for mode, value in recall.items()))
    assert recall["hybrid"] >= max(recall["dense"], recall["bm25"])
    assert recall["hybrid"] >= 0.8


def test_citations_point_at_the_page_holding_the_excerpt(
    index: HybridIndex, labels: list[Label], reader_pages: dict[str, dict[int, str]]
) -> None:
    checked = 0
    for label in labels[::5]:
        contexts = build_contexts(index, label.question, SETTINGS, word_tokens, 200_000)
        assert contexts.citations
        for citation in contexts.citations:
            assert citation.page is not None
            # The excerpt is the chunk's best-matching sentences, "…" where text was skipped.
            for piece in filter(None, re.split(r"\s*…\s*", citation.excerpt)):
                assert flat(piece) in flat(reader_pages[citation.source][citation.page])
            checked += 1
    assert checked >= 20


def test_rag_context_is_within_budget_and_in_document_order(index: HybridIndex) -> None:
    contexts = build_contexts(index, "How do I read an Excel spreadsheet?", SETTINGS, word_tokens, 200_000)
    assert contexts.long_tokens > SETTINGS.budget_min_tokens
    assert contexts.rag_tokens <= SETTINGS.budget_min_tokens
    headers = re.findall(r"^\[(R-[A-Za-z]+\.pdf), p\. (\d+)\]$", contexts.rag_context, flags=re.M)
    assert len(headers) == len(contexts.citations) >= 2
    order = [(source, int(page)) for source, page in headers]
    assert order == sorted(order)
    assert any(c.source == "R-data.pdf" and c.page == 36 for c in contexts.citations[:3])


def test_reopened_index_answers_like_the_first(index: HybridIndex, index_dir: Path, embedder: Embedder) -> None:
    question = "Why does R not release memory back to the operating system?"
    with HybridIndex(index_dir, SETTINGS, word_tokens, embedder) as again:
        assert [h.chunk.chunk_id for h in again.search(question)] == [h.chunk.chunk_id for h in index.search(question)]
        assert again.search(question, k=3)[0].chunk.page == 46


def test_real_qwen_tokenizer_sizes_chunks_and_contexts(tmp_path: Path) -> None:
    directory = require_model(SMALL)  # the drafter's tokenizer, where `make test` prepares it
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))

    def tokenize(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False).ids

    pages = read_document(R_DATA, 50 * MB)
    chunks = chunk_pages(pages, "doc", "R-data.pdf", tokenize, chunk_tokens=512)
    assert all(c.n_tokens == len(tokenize(c.text)) <= 512 for c in chunks)
    with HybridIndex(tmp_path / "i", SETTINGS, tokenize, HashEmbedder()) as index:  # type: ignore[arg-type]
        index.add_file(R_DATA)
        contexts = build_contexts(index, "How do I read an Excel spreadsheet?", SETTINGS, tokenize, 32_768)
    print(f"\nQwen tokens: R-data.pdf long context {contexts.long_tokens}, RAG context {contexts.rag_tokens}")
    assert 15_000 < contexts.long_tokens < 32_768
    assert contexts.rag_tokens <= SETTINGS.budget_min_tokens
