"""Value types that travel from files to answers: pages, chunks, citations, contexts."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class RetrievalSettings:
    """Retrieval knobs; one section of app.config.Settings."""

    chunk_tokens: int = 512  # paper setting; sized in the target model's tokens
    chunk_overlap: int = 0
    similarity_floor: float = 0.3  # cosine; dense hits under it are dropped (paper: 0.3)
    # Drafter context budget = max(budget_min_tokens, |C| * budget_fraction). The paper uses
    # max(4096, |C|/24) at 128K contexts; on a 2-core CPU the drafter's prefill of 4096 tokens
    # costs seconds per question, so the default minimum is smaller. Both are configurable.
    budget_min_tokens: int = 2048
    budget_fraction: float = 1 / 24
    candidates: int = 40  # hits taken from each of dense and BM25 before fusion
    rrf_k: int = 60  # reciprocal-rank-fusion constant
    max_file_bytes: int = 50 * 1024 * 1024
    chroma_url: str | None = None  # "http://host:port" selects chromadb.HttpClient for a shared index
    collection: str = "rapidqa"


@dataclass(frozen=True)
class Page:
    """One page (PDF) or section (other formats) of a document, with provenance."""

    text: str
    page: int | None  # 1-based page number; None for formats without pages
    section: str | None  # heading or other locator when there are no pages
    char_start: int  # offset of this page's text in the whole document text


def locator(source: str, page: int | None, section: str | None) -> str:
    """How a passage is named to a reader: "file.pdf, p. 3", "notes.md, Setup" or just "file.txt"."""
    where = f"p. {page}" if page is not None else (section or "")
    return f"{source}, {where}" if where else source


@dataclass(frozen=True)
class Chunk:
    chunk_id: str
    doc_id: str
    source: str  # document display name (file name)
    order: int  # position of the chunk inside its document
    text: str
    page: int | None
    section: str | None
    char_start: int
    char_end: int
    n_tokens: int

    def label(self) -> str:
        return locator(self.source, self.page, self.section)


@dataclass(frozen=True)
class ScoredChunk:
    chunk: Chunk
    score: float  # fused score (reciprocal rank fusion)
    dense_similarity: float | None  # cosine, when the dense side found it
    bm25_score: float | None


@dataclass(frozen=True)
class Citation:
    source: str
    page: int | None
    section: str | None
    excerpt: str
    score: float
    read: bool = True  # inside what the target read (False: retrieved from another window)

    def label(self) -> str:
        return locator(self.source, self.page, self.section)


@dataclass(frozen=True)
class PartEvidence:
    """The retrieved chunks that lie in one window of a large corpus."""

    part: int  # the window's number, 1-based
    retrieved: int  # retrieved chunks in it
    weight: float  # their routing votes: the sum of 1/rank (retrieval/windows.py)
    label: str = ""  # what the window holds


# Evidence elsewhere is called split when another window's votes reach this share of the read one's.
SPLIT_SHARE = 0.5


@dataclass(frozen=True)
class Reading:
    """Which window of a corpus larger than the target's window the target read, and where the
    retrieved evidence lies (so evidence outside it is never silent)."""

    window: int  # 1-based
    windows: int
    label: str  # what the window holds, e.g. "R-data.pdf, pages 1-12 of R-intro.pdf"
    evidence: tuple[PartEvidence, ...]  # windows holding retrieved chunks, in order
    retrieved: int  # retrieved chunks in all

    @property
    def elsewhere(self) -> int:
        return sum(e.retrieved for e in self.evidence if e.part != self.window)

    @property
    def split(self) -> bool:
        """Another window holds evidence nearly as strong as the window read: a close call."""
        here = sum(e.weight for e in self.evidence if e.part == self.window)
        return any(e.weight >= SPLIT_SHARE * here for e in self.evidence if e.part != self.window)

    def note(self) -> str:
        """One line for people: what was read and, when it applies, the evidence it left out."""
        text = f"read {self.label} (part {self.window} of {self.windows})"
        others = [f"part {e.part}: {e.label}" for e in self.evidence if e.part != self.window]
        if others:
            # Retrieved chunks usually touch several windows: say whether those left out were
            # weaker ones or nearly as strong as those read, so a close call stands out.
            split = self.split
            kind = "the evidence is split: " if split else ""
            strength = "nearly as strong as those read" if split else "weaker ones"
            text += (f"; {kind}{self.elsewhere} of {self.retrieved} retrieved passages, {strength}, lie in parts "
                     "not read (" + "; ".join(others) + ")")
        return text


@dataclass(frozen=True)
class DocumentInfo:
    doc_id: str
    source: str
    sha256: str
    n_chunks: int
    n_pages: int
    n_tokens: int


@dataclass(frozen=True)
class IngestResult:
    path: Path
    source: str
    status: str  # "added" | "unchanged" | "error"
    message: str = ""
    doc_id: str | None = None
    n_chunks: int = 0

    @property
    def ok(self) -> bool:
        return self.status != "error"


@dataclass(frozen=True)
class Contexts:
    """What one question needs: the target's long context, the drafter's short one, citations."""

    long_context: str
    long_tokens: int
    rag_context: str
    rag_tokens: int
    citations: list[Citation] = field(default_factory=list)
    # The same contexts as pieces (the strings joined above), for prompts tokenised piece by piece:
    long_documents: list[str] = field(default_factory=list)
    rag_passages: list[str] = field(default_factory=list)
    rag_chunk_ids: list[str] = field(default_factory=list)  # one per passage
    # Where those passages lie in the long context: (piece index, first char, end char) in
    # long_documents, for those the long context holds (a target drafting from its own cache).
    passage_spans: list[tuple[int, int, int]] = field(default_factory=list)
    reading: Reading | None = None  # set when the corpus has several windows
