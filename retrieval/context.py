"""Question + index -> the target's long context, the drafter's short (RAG) context, citations.

Long context: every document, whole, in the order they were added (so a new one extends it); for
a corpus larger than the target's window, the window (retrieval.windows) holding most of the
question's retrieved evidence. Never truncated: what does not fit is refused, because a silently
cut document gives wrong answers.
RAG context (paper settings): best chunks up to a token budget, across the whole corpus, put back
in document order.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import replace

from retrieval.errors import ContextTooLongError, EmptyIndexError
from retrieval.index import HybridIndex
from retrieval.lexical import bm25_tokens
from retrieval.types import Chunk, Citation, Contexts, DocumentInfo, Reading, RetrievalSettings, ScoredChunk
from retrieval.windows import Part, Route, Window, route, whole_document, whole_part

Tokenize = Callable[[str], Sequence[int]]
EXCERPT_CHARS = 300
EXCERPT_SENTENCES = 2
_SENTENCE_END = re.compile(r"(?<=[.!?;:])\s+")
_SUFFIXES = ("ing", "ed")


def build_contexts(
    index: HybridIndex,
    question: str,
    settings: RetrievalSettings,
    tokenize: Tokenize,
    max_long_tokens: int,
    windows: Sequence[Window] | None = None,
    max_rag_tokens: int | None = None,
) -> Contexts:
    """windows: the corpus as planned by retrieval.windows.plan_windows; None reads it as one.
    max_rag_tokens: what the RAG context's reader holds; caps the budget (|C|/24 outgrows any window
    on a large enough corpus)."""
    documents = index.documents(in_ingest_order=True)
    if not documents:
        raise EmptyIndexError("No documents are indexed yet: add documents first.")
    several = windows is not None and len(windows) > 1
    # The drafter's budget follows the whole corpus: it reads the best chunks wherever they are.
    corpus_tokens = sum(window.tokens for window in windows or ()) if several else 0
    if not several:
        # Whole documents, as parts too (a focus drafter locates the chunks in them).
        parts = [whole_part(doc, index.document_text(doc.doc_id), 0, doc.n_chunks - 1) for doc in documents]
        document_texts = [part.text for part in parts]
        corpus_tokens = len(tokenize("\n\n".join(document_texts)))
        _check_fits(corpus_tokens, max_long_tokens)
    budget = rag_budget(corpus_tokens, settings)
    if max_rag_tokens is not None:
        budget = min(budget, max_rag_tokens)
    hits = index.search(question, k=_candidates(index, budget, settings))
    # A chunk costs its text, its header line and two newline tokens at most: the budget bounds
    # what the drafter prefills.
    kept = select_chunks(hits, budget, lambda chunk: chunk.n_tokens + len(tokenize(_header(chunk))) + 2)
    routed: Route | None = None
    if several:
        assert windows is not None
        routed = route(windows, kept)
        document_texts = routed.window.pieces
        parts = list(routed.window.parts)
    long_context = "\n\n".join(document_texts)
    long_tokens = len(tokenize(long_context)) if several else corpus_tokens
    _check_fits(long_tokens, max_long_tokens)
    if corpus_tokens <= budget:
        # The whole corpus fits the drafter's budget: give it everything, in order.
        rag_chunks = [chunk for doc in documents for chunk in index.chunks(doc.doc_id)]
    else:
        rag_chunks = in_document_order([hit.chunk for hit in kept], [doc.doc_id for doc in documents])
    rag_passages = [passage(chunk) for chunk in rag_chunks]
    rag_context = "\n\n".join(rag_passages)
    return Contexts(
        long_context=long_context,
        long_tokens=long_tokens,
        rag_context=rag_context,
        rag_tokens=len(tokenize(rag_context)),
        citations=[citation(hit, question, routed) for hit in kept],
        long_documents=document_texts,
        rag_passages=rag_passages,
        rag_chunk_ids=[chunk.chunk_id for chunk in rag_chunks],
        passage_spans=locate_passages(parts, rag_chunks),
        reading=reading(routed, windows, kept) if routed else None,
    )


def locate_passages(parts: Sequence[Part], chunks: Sequence[Chunk]) -> list[tuple[int, int, int]]:
    """(piece index, first char, end char) of each chunk some part holds, in the parts' order."""
    spans = []
    for i, part in enumerate(parts):
        spans += [(i, *part.span(chunk)) for chunk in chunks if part.holds(chunk)]
    return sorted(spans)


def reading(routed: Route, windows: Sequence[Window] | None, kept: Sequence[ScoredChunk]) -> Reading:
    labels = {window.number: window.label() for window in windows or ()}
    return Reading(
        window=routed.window.number,
        windows=routed.windows,
        label=routed.window.label(),
        evidence=tuple(replace(e, label=labels.get(e.part, "")) for e in routed.evidence),
        retrieved=len(kept),
    )


def _check_fits(tokens: int, max_long_tokens: int) -> None:
    if tokens > max_long_tokens:
        raise ContextTooLongError(
            f"The documents are {tokens:,} tokens long but the model's context holds "
            f"{max_long_tokens:,}: remove some documents or use a model with a longer context."
        )


def long_document(index: HybridIndex, doc: DocumentInfo) -> str:
    """A document as the long context shows it: a header line with its name, then its whole text."""
    return whole_document(doc.source, index.document_text(doc.doc_id))


def long_documents(index: HybridIndex) -> list[str]:
    """Every document of the long context, in ingest order: adding one extends the context."""
    return [long_document(index, doc) for doc in index.documents(in_ingest_order=True)]


def passage(chunk: Chunk) -> str:
    """A chunk as the drafter's context shows it: its citation label, then its text."""
    return f"{_header(chunk)}\n{chunk.text}"


def rag_budget(long_tokens: int, settings: RetrievalSettings) -> int:
    return max(settings.budget_min_tokens, int(long_tokens * settings.budget_fraction))


def select_chunks(
    hits: list[ScoredChunk], budget: int, cost: Callable[[Chunk], int] = lambda chunk: chunk.n_tokens
) -> list[ScoredChunk]:
    """Best-first, every chunk that still fits the budget (a big one is skipped, a smaller later
    one may still fit); at least one chunk, so a tiny budget still gives the drafter something."""
    kept: list[ScoredChunk] = []
    used = 0
    for hit in hits:
        tokens = cost(hit.chunk)
        if used + tokens <= budget or not kept:
            kept.append(hit)
            used += tokens
    return kept


def in_document_order(chunks: list[Chunk], doc_order: list[str]) -> list[Chunk]:
    position = {doc_id: i for i, doc_id in enumerate(doc_order)}
    return sorted(chunks, key=lambda chunk: (position.get(chunk.doc_id, len(position)), chunk.order))


def citation(hit: ScoredChunk, question: str = "", routed: Route | None = None) -> Citation:
    chunk = hit.chunk
    read = routed is None or routed.window.holds(chunk)
    return Citation(chunk.source, chunk.page, chunk.section, best_sentences(chunk.text, question), hit.score, read)


def excerpt(text: str, limit: int = EXCERPT_CHARS) -> str:
    flat = " ".join(text.split())
    if len(flat) <= limit:
        return flat
    cut = flat.rfind(" ", 0, limit)
    return flat[: cut if cut > limit // 2 else limit] + "…"


def best_sentences(text: str, question: str, limit: int = EXCERPT_CHARS, keep: int = EXCERPT_SENTENCES) -> str:
    """The chunk's sentences that best match the question (BM25-style: each question word counts
    its rarity among the chunk's sentences), at most `keep`, in document order, "…" where text was
    skipped; the chunk's opening when no sentence shares a word with the question."""
    flat = " ".join(text.split())
    sentences = [s for s in _SENTENCE_END.split(flat) if s]
    terms = {_stem(word) for word in bm25_tokens(question)}
    words = [{_stem(word) for word in bm25_tokens(sentence)} & terms for sentence in sentences]
    n = len(sentences)
    idf = {term: math.log(1 + (n - df + 0.5) / (df + 0.5))
           for term in terms if (df := sum(term in found for found in words))}
    scores = [sum(idf[term] for term in found) for found in words]
    ranked = sorted((i for i in range(n) if scores[i] > 0), key=lambda i: (-scores[i], i))
    if not ranked:
        return excerpt(text, limit)
    chosen = [ranked[0]]
    for i in ranked[1:keep]:
        if sum(len(sentences[j]) + 2 for j in [*chosen, i]) <= limit:
            chosen.append(i)
    chosen.sort()
    out = "…" if chosen[0] > 0 else ""
    for previous, i in zip([-1, *chosen], chosen, strict=False):
        out += (" … " if previous >= 0 and i > previous + 1 else " " if previous >= 0 else "") + sentences[i]
    out = excerpt(out, limit)
    return out if out.endswith("…") or chosen[-1] == n - 1 else out + " …"


def _stem(word: str) -> str:
    """Plural and verb endings off, so "reads" matches "read" and "files" "file" (crude, but
    deterministic and cheap)."""
    if word.endswith(("sses", "ches", "shes", "xes")):
        word = word[:-2]
    elif word.endswith("ies") and len(word) > 4:
        word = word[:-3] + "y"
    elif word.endswith("s") and not word.endswith("ss") and len(word) > 3:
        word = word[:-1]
    for suffix in _SUFFIXES:
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            return word[: -len(suffix)]
    return word


def _header(chunk: Chunk) -> str:
    return f"[{chunk.label()}]"


def _candidates(index: HybridIndex, budget: int, settings: RetrievalSettings) -> int:
    """Enough hits to fill the budget twice over even with small chunks; at least the default."""
    documents = index.documents()
    chunks = sum(doc.n_chunks for doc in documents)
    mean_tokens = max(1, sum(doc.n_tokens for doc in documents) // max(1, chunks))
    return max(settings.candidates, 2 * budget // mean_tokens)
