"""The SQLite docstore: the source of truth for documents and chunks.

Chroma only holds vectors keyed by chunk id. Everything else (full text for the long context,
chunk text for BM25, provenance for citations) lives here, so a restart rebuilds BM25 without
re-reading any file, and Chroma can be reconciled against this store after a crash.

Each call opens its own short-lived connection: sqlite3 connections must not be shared across
threads, and WAL mode lets readers run while one writer commits.

Several processes may share one docstore (two `ask serve` on one corpus): every change to the
complete documents bumps a generation number in the same transaction, so a process holding a view
of the documents sees, with one cheap read, whether another process changed them since.
"""

from __future__ import annotations

import sqlite3
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from retrieval.types import Chunk

PENDING = "pending"
COMPLETE = "complete"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS documents (
    doc_id     TEXT PRIMARY KEY,
    source     TEXT NOT NULL,
    sha256     TEXT NOT NULL,
    n_pages    INTEGER NOT NULL,
    n_tokens   INTEGER NOT NULL,
    text       TEXT NOT NULL,
    status     TEXT NOT NULL CHECK (status IN ('pending', 'complete')),
    added_at   REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS chunks (
    chunk_id   TEXT PRIMARY KEY,
    doc_id     TEXT NOT NULL,
    source     TEXT NOT NULL,
    ord        INTEGER NOT NULL,
    text       TEXT NOT NULL,
    page       INTEGER,
    section    TEXT,
    char_start INTEGER NOT NULL,
    char_end   INTEGER NOT NULL,
    n_tokens   INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS chunks_by_doc ON chunks (doc_id, ord);
CREATE INDEX IF NOT EXISTS documents_by_source ON documents (source);
CREATE TABLE IF NOT EXISTS generation (
    id    INTEGER PRIMARY KEY CHECK (id = 0),
    value INTEGER NOT NULL
);
INSERT OR IGNORE INTO generation VALUES (0, 0);
CREATE TABLE IF NOT EXISTS identity (
    id    INTEGER PRIMARY KEY CHECK (id = 0),
    value TEXT NOT NULL
);
"""

_CHUNK_COLUMNS = "chunk_id, doc_id, source, ord, text, page, section, char_start, char_end, n_tokens"


@dataclass(frozen=True)
class StoredDocument:
    doc_id: str
    source: str
    sha256: str
    n_pages: int
    n_tokens: int
    text: str


@dataclass(frozen=True)
class DocumentRow:
    """A complete document without its text (the text is fetched on demand)."""

    doc_id: str
    source: str
    sha256: str
    n_pages: int
    n_tokens: int


class DocStore:
    def __init__(self, path: Path) -> None:
        self._path = path
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(_SCHEMA)
            db.execute("INSERT OR IGNORE INTO identity VALUES (0, ?)", (uuid.uuid4().hex,))

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self._path, timeout=30)
        try:
            with db:  # commits on success, rolls back on any exception
                yield db
        finally:
            db.close()

    # --- writes: pending -> complete, or removed ------------------------------------------------

    def add_pending(self, doc: StoredDocument, chunks: Sequence[Chunk]) -> None:
        with self._connect() as db:
            db.execute(
                "INSERT INTO documents VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (doc.doc_id, doc.source, doc.sha256, doc.n_pages, doc.n_tokens, doc.text, PENDING,
                 time.time()),
            )
            db.executemany(
                f"INSERT INTO chunks ({_CHUNK_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(c.chunk_id, c.doc_id, c.source, c.order, c.text, c.page, c.section, c.char_start,
                  c.char_end, c.n_tokens) for c in chunks],
            )

    def complete(self, doc_id: str, replaces: Sequence[str] = ()) -> None:
        """Mark a document complete and drop the versions it replaces, in one transaction."""
        with self._connect() as db:
            _delete(db, replaces)
            db.execute("UPDATE documents SET status = ? WHERE doc_id = ?", (COMPLETE, doc_id))
            _bump(db)

    def remove(self, doc_ids: Sequence[str]) -> None:
        with self._connect() as db:
            _delete(db, doc_ids)
            _bump(db)

    # --- reads -----------------------------------------------------------------------------------

    def identity(self) -> str:
        """A random id given to this docstore when it was created: which index a shared Chroma
        collection belongs to."""
        with self._connect() as db:
            (value,) = db.execute("SELECT value FROM identity WHERE id = 0").fetchone()
        return str(value)

    def generation(self) -> int:
        """Changes whenever the complete documents change, whichever process changed them."""
        with self._connect() as db:
            (value,) = db.execute("SELECT value FROM generation WHERE id = 0").fetchone()
        return int(value)

    def pending(self) -> list[str]:
        with self._connect() as db:
            rows = db.execute("SELECT doc_id FROM documents WHERE status = ?", (PENDING,)).fetchall()
        return [doc_id for (doc_id,) in rows]

    def chunk_ids(self, doc_ids: Sequence[str] | None = None) -> list[str]:
        """Chunk ids of the given documents (any status), or of every complete document when None."""
        with self._connect() as db:
            if doc_ids is None:
                rows = db.execute(
                    "SELECT chunk_id FROM chunks WHERE doc_id IN "
                    "(SELECT doc_id FROM documents WHERE status = ?)",
                    (COMPLETE,),
                ).fetchall()
            else:
                rows = []
                for doc_id in doc_ids:
                    rows += db.execute("SELECT chunk_id FROM chunks WHERE doc_id = ?", (doc_id,)).fetchall()
        return [chunk_id for (chunk_id,) in rows]

    def documents(self, in_ingest_order: bool = False) -> list[DocumentRow]:
        """Complete documents by source name, then doc_id (the order of every listing), or in the
        order they were added (the long context's: a new document extends it at the end)."""
        order = "added_at, doc_id" if in_ingest_order else "source, doc_id"
        with self._connect() as db:
            rows = db.execute(
                "SELECT doc_id, source, sha256, n_pages, n_tokens FROM documents "
                f"WHERE status = ? ORDER BY {order}",
                (COMPLETE,),
            ).fetchall()
        return [DocumentRow(*row) for row in rows]

    def chunks(self, chunk_ids: Sequence[str] | None = None) -> list[Chunk]:
        """Chunks of complete documents in document order, or the named ones (any status)."""
        with self._connect() as db:
            if chunk_ids is None:
                rows = db.execute(
                    f"SELECT {_CHUNK_COLUMNS} FROM chunks WHERE doc_id IN "
                    "(SELECT doc_id FROM documents WHERE status = ?) ORDER BY source, doc_id, ord",
                    (COMPLETE,),
                ).fetchall()
            else:
                rows = []
                for chunk_id in chunk_ids:
                    rows += db.execute(
                        f"SELECT {_CHUNK_COLUMNS} FROM chunks WHERE chunk_id = ?", (chunk_id,)
                    ).fetchall()
        return [Chunk(*row) for row in rows]

    def text(self, doc_id: str) -> str | None:
        with self._connect() as db:
            row = db.execute(
                "SELECT text FROM documents WHERE doc_id = ? AND status = ?", (doc_id, COMPLETE)
            ).fetchone()
        return row[0] if row else None


def _bump(db: sqlite3.Connection) -> None:
    db.execute("UPDATE generation SET value = value + 1 WHERE id = 0")


def _delete(db: sqlite3.Connection, doc_ids: Sequence[str]) -> None:
    for doc_id in doc_ids:
        db.execute("DELETE FROM chunks WHERE doc_id = ?", (doc_id,))
        db.execute("DELETE FROM documents WHERE doc_id = ?", (doc_id,))
