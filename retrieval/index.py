"""HybridIndex: add / delete / search over documents, dense (Chroma) + BM25 fused by RRF.

Write protocol (why a SIGKILL at any point leaves no half-indexed document):
  1. read, chunk and embed the file (nothing written yet; this is the slow part);
  2. docstore: insert the document and its chunks with status 'pending' (committed);
  3. Chroma: upsert the chunk vectors;
  4. docstore, one transaction: drop the version it replaces, mark this one 'complete';
  5. Chroma: delete the replaced version's vectors.
On open, pending documents are removed from both stores, then Chroma is reconciled with the
docstore (stray vectors deleted, missing ones re-embedded from the stored chunk text).

Readers never take the write lock: they use an immutable snapshot of the complete documents that
each write replaces as a whole, so concurrent searches see the index before or after a write.

Several processes may share one index (its folder, and a Chroma server for the vectors): the
write lock is a file lock (write_lock.py), so their writes and recoveries never interleave, and a
reader reloads its snapshot when the docstore's generation says another process changed the
documents since (one small read per listing or search), so what one process adds the other finds.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from tqdm import tqdm

from retrieval.chunking import chunk_pages
from retrieval.docstore import DocStore, StoredDocument
from retrieval.embedding import Embedder
from retrieval.errors import IngestError, RetrievalError
from retrieval.lexical import LexicalIndex
from retrieval.readers import (
    check_size,
    display_name,
    document_text,
    file_name,
    read_document_with_notes,
    supported_extensions,
)
from retrieval.types import Chunk, DocumentInfo, IngestResult, RetrievalSettings, ScoredChunk
from retrieval.vectors import ChromaVectors
from retrieval.write_lock import WriteLock

Tokenize = Callable[[str], Sequence[int]]
MODES = ("hybrid", "dense", "bm25")
ChunkVectors = list[list[float]]  # one chunk's vectors, one per embedder window


@dataclass(frozen=True)
class _Snapshot:
    """Everything a search needs, for one state of the index; replaced whole, never mutated."""

    generation: int  # the docstore's generation it was read at
    documents: tuple[DocumentInfo, ...]
    ingest_order: tuple[DocumentInfo, ...]  # the same documents in the order they were added
    chunks: tuple[Chunk, ...]  # document order: source, doc_id, chunk order
    by_id: Mapping[str, Chunk]
    by_doc: Mapping[str, tuple[Chunk, ...]]
    lexical: LexicalIndex


class HybridIndex:
    def __init__(
        self,
        directory: Path,
        settings: RetrievalSettings,
        tokenize: Tokenize,
        embedder: Embedder | None = None,
    ) -> None:
        self._directory = Path(directory)
        self._directory.mkdir(parents=True, exist_ok=True)
        self._settings = settings
        self._tokenize = tokenize
        self._embedder = embedder or Embedder()
        self._write_lock = WriteLock(self._directory)
        self._docstore = DocStore(self._directory / "docstore.sqlite")
        self._vectors = ChromaVectors(self._directory, settings)
        if settings.chroma_url:  # a local collection lives in this folder: only a server's is shared
            self._vectors.claim(self._docstore.identity(), self._directory)
        with self._write_lock.held():
            self._recover()
        self._snapshot = self._load_snapshot()

    @property
    def directory(self) -> Path:
        return self._directory

    # --- adding documents ------------------------------------------------------------------------

    def add_file(self, path: Path, source: str | None = None) -> IngestResult:
        """Index one file. Raises IngestError (index unchanged) when the file cannot be used."""
        path = Path(path)
        name = display_name(source if source is not None else path.name)
        check_size(path, self._settings.max_file_bytes)
        sha256 = _file_sha256(path)
        doc_id = self._doc_id(sha256)
        existing = self._find(doc_id)
        if existing is not None:
            return _unchanged(path, name, existing)
        read = read_document_with_notes(path, self._settings.max_file_bytes)
        text = document_text(read.pages)
        chunks = chunk_pages(
            read.pages, doc_id, name, self._tokenize,
            chunk_tokens=self._settings.chunk_tokens, overlap=self._settings.chunk_overlap,
        )
        if not chunks:
            raise IngestError(f"{file_name(path)}: the file contains no text.")
        vectors = self._embedder.embed_passages([chunk.text for chunk in chunks])
        document = StoredDocument(
            doc_id=doc_id,
            source=name,
            sha256=sha256,
            n_pages=len(read.pages),
            n_tokens=len(self._tokenize(text)),
            text=text,
        )
        with self._write_lock.held():
            existing = self._find(doc_id)  # another thread or process may have added it meanwhile
            if existing is not None:
                return _unchanged(path, name, existing)
            replaced = self._commit(document, chunks, vectors)
        notes = list(read.notes) + (["replaced the previous version"] if replaced else [])
        return IngestResult(path, name, "added", "; ".join(notes), doc_id, len(chunks))

    def add_files(self, paths: Iterable[Path], progress: bool = True) -> list[IngestResult]:
        """Index files and folders (a folder adds its supported files); one result per file, never raises
        for a bad file, so one corrupt upload does not stop the rest."""
        files = expand_paths(paths)
        results = []
        for path in tqdm(files, desc="Indexing", unit="file", disable=not progress):
            try:
                results.append(self.add_file(path))
            except RetrievalError as exc:
                results.append(IngestResult(path, file_name(path), "error", str(exc)))
            except Exception as exc:  # unexpected bug: report it for this file, keep going
                message = f"{file_name(path)}: unexpected error ({type(exc).__name__}: {exc})".splitlines()[0]
                results.append(IngestResult(path, file_name(path), "error", message))
        return results

    def _commit(self, document: StoredDocument, chunks: list[Chunk], vectors: list[ChunkVectors]) -> bool:
        """Steps 2-5 of the write protocol; returns whether an older version was replaced.
        The caller holds the write lock, so a pending document now is one a process left when it
        died: it goes first (another process sharing the index may have written it; this one never
        reopens the index to recover)."""
        abandoned = self._docstore.pending()
        if abandoned:
            self._discard(abandoned)
        old_ids = [doc.doc_id for doc in self._current().documents if doc.source == document.source]
        self._write_pending(document, chunks)
        try:
            self._write_vectors(chunks, vectors)
            self._mark_complete(document.doc_id, old_ids)
        except BaseException as exc:
            self._discard([document.doc_id])
            if isinstance(exc, Exception):  # a store failed: report it; Ctrl-C and exits pass through
                raise IngestError(f"{document.source}: could not be written to the index ({exc}).") from exc
            raise
        try:
            self._vectors.delete_documents(old_ids)  # if this fails, the next open removes them
        finally:
            self._snapshot = self._load_snapshot()
        return bool(old_ids)

    # Three seams, one per step, so tests can fail or kill the process between them.
    def _write_pending(self, document: StoredDocument, chunks: list[Chunk]) -> None:
        self._docstore.add_pending(document, chunks)

    def _write_vectors(self, chunks: list[Chunk], vectors: list[ChunkVectors]) -> None:
        self._vectors.upsert([c.chunk_id for c in chunks], [c.doc_id for c in chunks], vectors)

    def _mark_complete(self, doc_id: str, replaces: list[str]) -> None:
        self._docstore.complete(doc_id, replaces)

    # --- removing documents ----------------------------------------------------------------------

    def delete(self, doc_id_or_source: str) -> bool:
        """Remove a document by doc_id or source name; False when there is no such document."""
        with self._write_lock.held():
            doc_ids = [
                doc.doc_id
                for doc in self._current().documents
                if doc_id_or_source in (doc.doc_id, doc.source)
            ]
            if not doc_ids:
                return False
            # Docstore first: a crash before the Chroma delete leaves stray vectors that the next
            # open removes, never a listed document without vectors.
            self._docstore.remove(doc_ids)
            try:
                self._vectors.delete_documents(doc_ids)
            finally:
                self._snapshot = self._load_snapshot()
        return True

    def _discard(self, doc_ids: list[str]) -> None:
        """Remove (pending) documents from both stores; the docstore last, so it can be retried."""
        self._vectors.delete_documents(doc_ids)
        self._docstore.remove(doc_ids)

    # --- reading ---------------------------------------------------------------------------------

    def documents(self, in_ingest_order: bool = False) -> list[DocumentInfo]:
        """By source name (listings), or in the order they were added (the long context)."""
        snapshot = self._current()
        return list(snapshot.ingest_order if in_ingest_order else snapshot.documents)

    def chunks(self, doc_id: str) -> list[Chunk]:
        """From the snapshot the last listing or search saw (no generation read: callers ask for
        each listed document's chunks in turn, and one read per document adds up)."""
        return list(self._snapshot.by_doc.get(doc_id, ()))

    def document_text(self, doc_id: str) -> str:
        text = self._docstore.text(doc_id)
        if text is None:
            raise RetrievalError(f"No indexed document has the id {doc_id!r}.")
        return text

    def total_tokens(self) -> int:
        return sum(doc.n_tokens for doc in self._current().documents)

    def corpus_fingerprint(self) -> str:
        """Changes whenever the long context would change: documents added, deleted or renamed.
        Source names are included because they appear in the long context's headers."""
        digest = hashlib.sha256()
        for doc in self._current().documents:
            digest.update(f"{doc.source}\0{doc.sha256}\n".encode())
        return digest.hexdigest()

    def search(self, question: str, k: int | None = None, mode: str = "hybrid") -> list[ScoredChunk]:
        """Best chunks for a question, best first; k=None returns every candidate that survived."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        snapshot = self._current()
        if not snapshot.chunks or not question.strip():
            return []
        n = max(self._settings.candidates, k or 0)
        dense = self._dense(snapshot, question, n) if mode in ("hybrid", "dense") else []
        lexical = snapshot.lexical.search(question, n) if mode in ("hybrid", "bm25") else []
        fused = fuse(dense, lexical, self._settings.rrf_k)
        return fused[:k] if k is not None else fused

    def _dense(self, snapshot: _Snapshot, question: str, n: int) -> list[tuple[Chunk, float]]:
        hits = self._vectors.query(self._embedder.embed_query(question), n)
        # Ids outside the snapshot belong to a write in progress or a delete just made: skip them,
        # so dense and BM25 always rank the same set of chunks.
        return [
            (snapshot.by_id[chunk_id], similarity)
            for chunk_id, similarity in hits
            if similarity >= self._settings.similarity_floor and chunk_id in snapshot.by_id
        ]

    def close(self) -> None:
        with self._write_lock.held():
            self._vectors.close()

    def __enter__(self) -> HybridIndex:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- opening ---------------------------------------------------------------------------------

    def _recover(self) -> None:
        """Undo interrupted writes, then make Chroma hold exactly the complete chunks."""
        pending = self._docstore.pending()
        if pending:
            self._discard(pending)
        expected = set(self._docstore.chunk_ids())
        stored = self._vectors.chunk_ids_by_vector()
        stray = sorted(vector_id for vector_id, chunk_id in stored.items() if chunk_id not in expected)
        if stray:
            self._vectors.delete_ids(stray)
        missing = sorted(expected - set(stored.values()))
        if missing:  # e.g. the chroma folder was deleted: the docstore still has every chunk's text
            chunks = self._docstore.chunks(missing)
            self._write_vectors(chunks, self._embedder.embed_passages([c.text for c in chunks]))

    def _current(self) -> _Snapshot:
        """The snapshot, reloaded first when another process (or this one) changed the documents."""
        snapshot = self._snapshot
        if snapshot.generation != self._docstore.generation():
            snapshot = self._snapshot = self._load_snapshot()
        return snapshot

    def _load_snapshot(self) -> _Snapshot:
        """Read until the generation is the same before and after: no other process's change was
        committed in between, so documents and chunks agree."""
        while True:
            generation = self._docstore.generation()
            snapshot = self._read_snapshot(generation)
            if self._docstore.generation() == generation:
                return snapshot

    def _read_snapshot(self, generation: int) -> _Snapshot:
        rows = self._docstore.documents()
        chunks = tuple(self._docstore.chunks())
        by_doc: dict[str, list[Chunk]] = {}
        for chunk in chunks:
            by_doc.setdefault(chunk.doc_id, []).append(chunk)
        documents = tuple(
            DocumentInfo(row.doc_id, row.source, row.sha256, len(by_doc.get(row.doc_id, ())), row.n_pages,
                         row.n_tokens)
            for row in rows
        )
        position = {row.doc_id: i for i, row in enumerate(self._docstore.documents(in_ingest_order=True))}
        return _Snapshot(
            generation=generation,
            documents=documents,
            ingest_order=tuple(sorted(documents, key=lambda doc: position.get(doc.doc_id, len(position)))),
            chunks=chunks,
            by_id=MappingProxyType({chunk.chunk_id: chunk for chunk in chunks}),
            by_doc=MappingProxyType({doc_id: tuple(group) for doc_id, group in by_doc.items()}),
            lexical=LexicalIndex(chunks),
        )

    # --- helpers ---------------------------------------------------------------------------------

    def _doc_id(self, sha256: str) -> str:
        """Content hash plus chunking settings: re-adding a file after the chunk size changed
        re-chunks it instead of reporting it unchanged."""
        key = f"{sha256}:{self._settings.chunk_tokens}:{self._settings.chunk_overlap}"
        return hashlib.sha256(key.encode()).hexdigest()[:20]

    def _find(self, doc_id: str) -> DocumentInfo | None:
        return next((doc for doc in self._current().documents if doc.doc_id == doc_id), None)


def fuse(
    dense: list[tuple[Chunk, float]], lexical: list[tuple[Chunk, float]], rrf_k: int
) -> list[ScoredChunk]:
    """Reciprocal rank fusion: score = sum over rankings of 1 / (rrf_k + rank), rank from 1."""
    scores: dict[str, float] = {}
    similarity: dict[str, float] = {}
    bm25: dict[str, float] = {}
    chunks: dict[str, Chunk] = {}
    for ranking, values in ((dense, similarity), (lexical, bm25)):
        for rank, (chunk, value) in enumerate(ranking, start=1):
            scores[chunk.chunk_id] = scores.get(chunk.chunk_id, 0.0) + 1.0 / (rrf_k + rank)
            values[chunk.chunk_id] = value
            chunks[chunk.chunk_id] = chunk
    fused = [
        ScoredChunk(chunks[cid], score, similarity.get(cid), bm25.get(cid)) for cid, score in scores.items()
    ]
    # Ties (a chunk ranked n by dense and another ranked n by BM25) go to document order.
    fused.sort(key=lambda hit: (-hit.score, hit.chunk.source, hit.chunk.doc_id, hit.chunk.order))
    return fused


def expand_paths(paths: Iterable[Path]) -> list[Path]:
    """Folders become their supported files (recursively, hidden ones skipped, sorted)."""
    extensions = set(supported_extensions())
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            files += sorted(
                p for p in path.rglob("*")
                if p.is_file() and p.suffix.lower() in extensions
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
        else:
            files.append(path)
    return files


def _file_sha256(path: Path) -> str:
    try:
        with path.open("rb") as handle:
            return hashlib.file_digest(handle, "sha256").hexdigest()
    except OSError as exc:
        raise IngestError(f"{file_name(path)}: cannot read the file ({exc.strerror or exc}).") from None


def _unchanged(path: Path, name: str, existing: DocumentInfo) -> IngestResult:
    message = "already indexed" if existing.source == name else f"same content as {existing.source}"
    return IngestResult(path, name, "unchanged", message, existing.doc_id, existing.n_chunks)
