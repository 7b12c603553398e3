"""The corpus cut into windows the target reads whole, and the window a question is routed to.

A corpus larger than the target's window is read one window at a time. Windows hold documents in
ingest order, packed greedily: a document that fits a window is never cut (it starts a new window
when the current one is full); a document longer than a window is cut between pages, and a page
longer than a window between chunks. Packing in ingest order keeps every window's prefix cacheable:
adding a document changes only the last window (or adds windows), deleting one changes the windows
from the one that held it.

Routing: the retrieved chunks (the drafter's, best first) vote for the windows holding them, the
chunk at rank r with weight 1/r; the window with the highest sum is read, and a tie (sums are exact
fractions) goes to the window holding the best-ranked chunk. Rank weights rather than the fused
scores themselves: reciprocal-rank-fusion scores are nearly flat over the top dozen chunks, so their
sum counts chunks and lets a long tail of weak hits outvote the best ones (bench/windows.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction

from retrieval.errors import ContextTooLongError
from retrieval.index import HybridIndex
from retrieval.types import Chunk, DocumentInfo, PartEvidence, ScoredChunk

PieceTokens = Callable[[str], int]  # a piece's token count, tokenised as the long prompt holds it


def document_header(source: str, where: str = "") -> str:
    return f"### Document: {source}{', ' + where if where else ''}\n"


@dataclass(frozen=True)
class Part:
    """A whole document, or a run of its pages (chunks first_chunk..last_chunk), as one piece."""

    doc_id: str
    source: str
    first_chunk: int
    last_chunk: int
    first_page: int | None
    last_page: int | None
    whole: bool
    text: str  # the piece: a header line naming the document (and its pages), then the text
    offset: int = 0  # where the document's character 0 falls in the piece (before it, for a cut one)

    def holds(self, chunk: Chunk) -> bool:
        return chunk.doc_id == self.doc_id and self.first_chunk <= chunk.order <= self.last_chunk

    def span(self, chunk: Chunk) -> tuple[int, int]:
        """The chunk's character range in the piece (a chunk the part holds)."""
        start, end = chunk.char_start + self.offset, chunk.char_end + self.offset
        return max(0, start), min(len(self.text), end)

    def label(self) -> str:
        if self.whole:
            return self.source
        return f"{_pages(self.first_page, self.last_page) or 'part'} of {self.source}"


@dataclass(frozen=True)
class Window:
    number: int  # 1-based
    parts: tuple[Part, ...]
    tokens: int  # sum of the pieces' tokens

    @property
    def pieces(self) -> list[str]:
        return [part.text for part in self.parts]

    def holds(self, chunk: Chunk) -> bool:
        return any(part.holds(chunk) for part in self.parts)

    def label(self) -> str:
        """What the target reads, e.g. "R-data.pdf, pages 1-12 of R-intro.pdf"."""
        return ", ".join(part.label() for part in self.parts)


@dataclass(frozen=True)
class Route:
    window: Window
    windows: int  # how many windows the corpus has
    evidence: tuple[PartEvidence, ...]  # windows holding retrieved chunks, in order (no labels)

    @property
    def elsewhere(self) -> int:
        """Retrieved chunks that lie outside the window read."""
        return sum(e.retrieved for e in self.evidence if e.part != self.window.number)


@dataclass(frozen=True)
class _Unit:
    """What packing moves as one: a whole document, a page of a cut one, or a chunk of a cut page."""

    doc: DocumentInfo
    whole: bool
    first_chunk: int
    last_chunk: int
    start: int  # character range in the document text
    end: int
    first_page: int | None
    last_page: int | None
    tokens: int  # tokens of the text (of the whole piece for a whole document)


def plan_windows(index: HybridIndex, piece_tokens: PieceTokens, capacity: int) -> list[Window]:
    """Windows whose pieces take at most `capacity` tokens each; one window when the corpus fits."""
    texts = {doc.doc_id: index.document_text(doc.doc_id) for doc in index.documents(in_ingest_order=True)}
    units = [unit for doc in index.documents(in_ingest_order=True)
             for unit in _units(doc, texts[doc.doc_id], index.chunks(doc.doc_id), piece_tokens, capacity)]
    header_tokens = piece_tokens(document_header("x" * 24, "pages 1000-1000"))  # a generous header
    windows: list[Window] = []
    start = 0
    while start < len(units):
        end, estimate = start, 0
        while end < len(units):
            # A cut document's units share one header per window; a whole document has its own.
            extra = units[end].tokens + (0 if units[end].whole or _continues(units, start, end) else header_tokens)
            if end > start and estimate + extra > capacity:
                break
            estimate += extra
            end += 1
        window = _window(len(windows) + 1, units[start:end], texts, piece_tokens)
        while window.tokens > capacity and end - start > 1:  # the estimate was short: give back units
            end -= 1
            window = _window(len(windows) + 1, units[start:end], texts, piece_tokens)
        if window.tokens > capacity:
            raise ContextTooLongError(
                f"{units[start].doc.source} has a passage of {window.tokens:,} tokens, more than the "
                f"{capacity:,} the model reads at once: use a model with a longer context."
            )
        windows.append(window)
        start = end
    return windows


def route(windows: Sequence[Window], hits: Sequence[ScoredChunk]) -> Route:
    """The window holding most of the retrieved evidence (see the module docstring)."""
    scores = [Fraction(0)] * len(windows)
    counts = [0] * len(windows)
    first: int | None = None
    for rank, hit in enumerate(hits, start=1):
        where = next((i for i, window in enumerate(windows) if window.holds(hit.chunk)), None)
        if where is None:
            continue
        scores[where] += Fraction(1, rank)
        counts[where] += 1
        first = where if first is None else first
    best = first if first is not None else 0
    for i, score in enumerate(scores):
        if score > scores[best]:
            best = i
    evidence = tuple(PartEvidence(windows[i].number, n, float(scores[i])) for i, n in enumerate(counts) if n)
    return Route(windows[best], len(windows), evidence)


def _units(doc: DocumentInfo, text: str, chunks: Sequence[Chunk], piece_tokens: PieceTokens,
           capacity: int) -> list[_Unit]:
    whole = whole_document(doc.source, text)
    tokens = piece_tokens(whole)
    if tokens <= capacity or not chunks:
        first_page, last_page = chunks[0].page if chunks else None, chunks[-1].page if chunks else None
        last = chunks[-1].order if chunks else 0
        return [_Unit(doc, True, 0, last, 0, len(text), first_page, last_page, tokens)]
    # Cut between pages: a page runs from its first chunk to the next page's first chunk, so the
    # pieces of a cut document hold all of its text.
    pages: list[list[Chunk]] = []
    for chunk in chunks:
        if pages and pages[-1][-1].page == chunk.page:
            pages[-1].append(chunk)
        else:
            pages.append([chunk])
    starts = [0, *(page[0].char_start for page in pages[1:]), len(text)]
    units = []
    for page, begin, end in zip(pages, starts, starts[1:], strict=False):
        tokens = piece_tokens(text[begin:end])
        if tokens <= capacity:
            units.append(_Unit(doc, False, page[0].order, page[-1].order, begin, end, page[0].page, page[0].page,
                               tokens))
            continue
        chunk_starts = [begin, *(chunk.char_start for chunk in page[1:]), end]  # a page over a window
        for chunk, a, b in zip(page, chunk_starts, chunk_starts[1:], strict=False):
            units.append(_Unit(doc, False, chunk.order, chunk.order, a, b, chunk.page, chunk.page,
                               piece_tokens(text[a:b])))
    return units


def whole_document(source: str, text: str) -> str:
    """A document as the long context shows it: a header line with its name, then its whole text."""
    return f"{document_header(source)}{text}"


def _continues(units: Sequence[_Unit], start: int, i: int) -> bool:
    """Whether unit i continues the previous unit's piece (same cut document, same window)."""
    return i > start and units[i - 1].doc.doc_id == units[i].doc.doc_id and not units[i].whole


def _window(number: int, units: Sequence[_Unit], texts: dict[str, str], piece_tokens: PieceTokens) -> Window:
    parts: list[Part] = []
    run: list[_Unit] = []
    for i, unit in enumerate(units):
        run.append(unit)
        if i + 1 == len(units) or not _continues(units, 0, i + 1):
            parts.append(_part(run, texts[unit.doc.doc_id]))
            run = []
    return Window(number, tuple(parts), sum(piece_tokens(part.text) for part in parts))


def _part(run: Sequence[_Unit], text: str) -> Part:
    first, last = run[0], run[-1]
    doc = first.doc
    if first.whole:
        return whole_part(doc, text, first.first_chunk, last.last_chunk, first.first_page, last.last_page)
    raw = text[first.start:last.end]
    header = document_header(doc.source, _pages(first.first_page, last.last_page))
    offset = len(header) - (first.start + len(raw) - len(raw.lstrip("\n")))
    return Part(doc.doc_id, doc.source, first.first_chunk, last.last_chunk, first.first_page, last.last_page,
                False, header + raw.strip("\n"), offset)


def whole_part(doc: DocumentInfo, text: str, first_chunk: int, last_chunk: int, first_page: int | None = None,
               last_page: int | None = None) -> Part:
    """A document read whole: its piece is whole_document's, its text starts after the header."""
    return Part(doc.doc_id, doc.source, first_chunk, last_chunk, first_page, last_page, True,
                whole_document(doc.source, text), len(document_header(doc.source)))


def _pages(first: int | None, last: int | None) -> str:
    if first is None or last is None:
        return ""
    return f"page {first}" if first == last else f"pages {first}-{last}"
