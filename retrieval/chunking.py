"""Pages -> chunks sized in the target model's tokens, each keeping where it came from."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from llama_index.core.node_parser import SentenceSplitter

from retrieval.errors import IngestError
from retrieval.types import Chunk, Page

Tokenize = Callable[[str], Sequence[int]]


def chunk_pages(
    pages: list[Page],
    doc_id: str,
    source: str,
    tokenize: Tokenize,
    chunk_tokens: int = 512,
    overlap: int = 0,
) -> list[Chunk]:
    """Split each page on its own, so every chunk has exactly one page to cite."""
    if chunk_tokens < 1 or not 0 <= overlap < chunk_tokens:
        raise ValueError(f"need chunk_tokens >= 1 and 0 <= overlap < chunk_tokens: {chunk_tokens}, {overlap}")
    splitter = SentenceSplitter(chunk_size=chunk_tokens, chunk_overlap=overlap, tokenizer=tokenize)
    chunks: list[Chunk] = []
    for page in pages:
        for text, start in _split_page(splitter, page.text, source):
            chunks.append(
                Chunk(
                    chunk_id=chunk_id(doc_id, len(chunks)),
                    doc_id=doc_id,
                    source=source,
                    order=len(chunks),
                    text=text,
                    page=page.page,
                    section=page.section,
                    char_start=page.char_start + start,
                    char_end=page.char_start + start + len(text),
                    n_tokens=len(tokenize(text)),
                )
            )
    return chunks


def chunk_id(doc_id: str, order: int) -> str:
    return f"{doc_id}-{order:06d}"


def _split_page(splitter: SentenceSplitter, text: str, source: str) -> list[tuple[str, int]]:
    """(chunk text, offset in the page) pairs; pieces are located in the page text in order."""
    if not text.strip():
        return []
    try:
        pieces = splitter.split_text(text)
    except ValueError as exc:  # "Single token exceeded chunk size": a pathological character run
        raise IngestError(f"{source}: the text cannot be split into chunks ({exc}).") from None
    located: list[tuple[str, int]] = []
    cursor = 0
    for piece in pieces:
        start = text.find(piece, cursor)
        if start < 0:
            # The splitter only strips and rejoins, so this should not happen; if a future version
            # rewrites whitespace, keep the chunk with the best offset we know rather than drop it.
            start = min(cursor, len(text))
        located.append((piece, start))
        # With overlap the next piece starts inside this one, so only step past its first character.
        cursor = start + (1 if splitter.chunk_overlap else len(piece))
    return located
