"""The dense side: a Chroma collection of chunk vectors (cosine), embeddings always passed in.

A chunk may have several vectors (one per embedder window, see Embedder.embed_passages); each
is tagged with its chunk and document. Texts live in the docstore only. That keeps this class a
narrow seam: a Chroma server (settings.chroma_url) or another vector store swaps in.
"""

from __future__ import annotations

import fcntl
import re
from collections.abc import Sequence
from pathlib import Path
from typing import IO
from urllib.parse import urlparse

import chromadb
from chromadb.config import Settings as ChromaSettings

from retrieval.errors import RetrievalError
from retrieval.types import RetrievalSettings

# Chroma's own rule for collection names (3-512 characters, checked here for a readable error).
_COLLECTION_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{1,510}[A-Za-z0-9]$")
_PAGE = 5000  # ids fetched per call when listing the whole collection
_INDEX_KEY = "rapidqa_index"  # collection metadata: the id of the docstore whose vectors it holds
LOCAL_LOCK = "chroma.lock"  # held by the process using the index folder's own Chroma store


class ChromaVectors:
    def __init__(self, directory: Path, settings: RetrievalSettings) -> None:
        if not _COLLECTION_NAME.match(settings.collection):
            raise RetrievalError(
                f"Invalid collection name {settings.collection!r}: "
                "use 3-512 letters, digits, '.', '_' or '-'."
            )
        # A local store serves one process only: another one's reads fail inside Chroma.
        self._local_lock = None if settings.chroma_url else _hold_local_store(directory)
        self._client = _client(directory, settings.chroma_url)
        # No embedding function: Chroma's default downloads a model, which fails offline.
        self._collection = self._client.get_or_create_collection(
            settings.collection, configuration={"hnsw": {"space": "cosine"}}, embedding_function=None
        )
        space = (self._collection.configuration.get("hnsw") or {}).get("space")
        if space not in (None, "cosine"):
            raise RetrievalError(
                f"Collection {settings.collection!r} uses '{space}' distance, not cosine: "
                "choose another collection name."
            )
        self._batch = max(1, min(self._client.get_max_batch_size(), 1000))

    def claim(self, index_id: str, where: Path) -> None:
        """Tag a server's collection with the index (docstore) it belongs to, or refuse one that
        belongs to another: opening an index deletes the vectors its docstore does not list, which
        would be the other index's."""
        metadata = dict(self._collection.metadata or {})
        owner = metadata.get(_INDEX_KEY)
        if owner is None:
            self._collection.modify(metadata={**metadata, _INDEX_KEY: index_id})
        elif owner != index_id:
            raise RetrievalError(
                f"The Chroma collection {self._collection.name!r} belongs to another index, not the one in {where}: "
                "point every process sharing it at that index's folder (--index), or use another Chroma server."
            )

    def upsert(
        self, chunk_ids: Sequence[str], doc_ids: Sequence[str], vectors: Sequence[Sequence[Sequence[float]]]
    ) -> None:
        """Store each chunk's window vectors as "<chunk_id>#<window>", tagged with chunk and doc."""
        rows = [
            (f"{chunk_id}#{window}", list(vector), {"chunk_id": chunk_id, "doc_id": doc_id})
            for chunk_id, doc_id, windows in zip(chunk_ids, doc_ids, vectors, strict=True)
            for window, vector in enumerate(windows)
        ]
        for start in range(0, len(rows), self._batch):
            ids, embeddings, metadatas = zip(*rows[start : start + self._batch], strict=True)
            self._collection.upsert(ids=list(ids), embeddings=list(embeddings), metadatas=list(metadatas))

    def delete_documents(self, doc_ids: Sequence[str]) -> None:
        for doc_id in doc_ids:
            self._collection.delete(where={"doc_id": doc_id})

    def delete_ids(self, vector_ids: Sequence[str]) -> None:
        for start in range(0, len(vector_ids), self._batch):
            self._collection.delete(ids=list(vector_ids[start : start + self._batch]))

    def query(self, vector: Sequence[float], n: int) -> list[tuple[str, float]]:
        """Up to n (chunk id, cosine similarity) pairs, most similar first; a chunk scores as its
        best window."""
        if n < 1:
            return []
        # Windows, not chunks, come back: ask for more so that n distinct chunks usually remain.
        result = self._collection.query(
            query_embeddings=[list(vector)], n_results=3 * n, include=["distances", "metadatas"]
        )
        best: dict[str, float] = {}
        for metadata, distance in zip(result["metadatas"][0], result["distances"][0], strict=True):
            if metadata is None:  # a window deleted while the query ran: Chroma returns its id without metadata
                continue
            chunk_id = str(metadata["chunk_id"])
            best.setdefault(chunk_id, 1.0 - float(distance))  # cosine distance = 1 - similarity
        return list(best.items())[:n]

    def chunk_ids_by_vector(self) -> dict[str, str]:
        """Every stored vector id -> its chunk id (for reconciling with the docstore)."""
        found: dict[str, str] = {}
        offset = 0
        while True:
            page = self._collection.get(include=["metadatas"], limit=_PAGE, offset=offset)
            for vector_id, metadata in zip(page["ids"], page["metadatas"], strict=True):
                found[vector_id] = str((metadata or {}).get("chunk_id", ""))
            if len(page["ids"]) < _PAGE:
                return found
            offset += _PAGE

    def count(self) -> int:
        return self._collection.count()

    def close(self) -> None:
        self._client.close()
        if self._local_lock is not None:
            self._local_lock.close()  # releases the lock


def _hold_local_store(directory: Path) -> IO[str]:
    """Lock the index folder's Chroma store for this process, or say how several processes share an
    index. A POSIX record lock belongs to the process: this process may open the index again (its
    Chroma clients share one store), another process is refused."""
    handle = (directory / LOCAL_LOCK).open("a")
    try:
        fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        handle.close()
        raise RetrievalError(
            f"The index in {directory} is open in another process, and its vectors are stored in the index folder, "
            "which only one process can use. To serve one index from several processes, run a Chroma server "
            "(`chroma run --path DIR --port PORT`) and pass --chroma-url http://127.0.0.1:PORT to each of them."
        ) from error
    return handle


def _client(directory: Path, url: str | None) -> chromadb.ClientAPI:
    settings = ChromaSettings(anonymized_telemetry=False)
    if not url:
        return chromadb.PersistentClient(path=str(directory / "chroma"), settings=settings)
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise RetrievalError(f"Invalid Chroma URL {url!r}: expected http://host:port.")
    https = parsed.scheme == "https"
    port = parsed.port or (443 if https else 8000)
    try:
        return chromadb.HttpClient(host=parsed.hostname, port=port, ssl=https, settings=settings)
    except ValueError as error:  # chromadb's way of saying the server did not answer
        raise RetrievalError(f"Could not reach the Chroma server at {url}: is `chroma run` serving there? "
                             f"({error})") from error
