"""One index shared by several processes (two `ask serve` on one corpus): its folder (docstore,
write lock) and one Chroma server for the vectors. Each HybridIndex here stands for one process:
two instances share nothing in memory, and file locks exclude them as they exclude processes.

These use HashEmbedder (no model); test_shared_serve.py runs two real `ask serve` processes.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from retrieval.index import HybridIndex
from retrieval.types import RetrievalSettings
from tests.chroma_server import chroma_server
from tests.retrieval_fixtures import HashEmbedder, word_tokens, write

pytestmark = pytest.mark.timeout(120)

ALPACA = "Alpacas are domesticated camelids from South America. Their fleece is soft and warm."
GLACIER = "Glaciers form where snow accumulates faster than it melts, then flow slowly downhill."


@pytest.fixture(scope="module")
def chroma_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with chroma_server(tmp_path_factory.mktemp("chroma") / "data") as url:
        yield url


@pytest.fixture
def settings(chroma_url: str, request: pytest.FixtureRequest) -> RetrievalSettings:
    """A collection of the test's own on the shared server."""
    return RetrievalSettings(chunk_tokens=64, chroma_url=chroma_url, collection=f"t-{request.node.name[:40]}")


def open_index(directory: Path, settings: RetrievalSettings) -> HybridIndex:
    return HybridIndex(directory, settings, word_tokens, HashEmbedder())  # type: ignore[arg-type]


def test_a_document_added_through_one_process_is_found_through_the_other(
        tmp_path: Path, settings: RetrievalSettings) -> None:
    with open_index(tmp_path / "index", settings) as first, open_index(tmp_path / "index", settings) as second:
        assert second.documents() == []
        first.add_file(write(tmp_path / "alpaca.txt", ALPACA))
        assert [d.source for d in second.documents()] == ["alpaca.txt"]
        for mode in ("dense", "bm25", "hybrid"):
            assert [hit.chunk.source for hit in second.search("alpacas fleece warm", k=1, mode=mode)] == ["alpaca.txt"]
        assert second.chunks(second.documents()[0].doc_id)
        assert second.delete("alpaca.txt")
        assert first.documents() == [] and first.search("alpacas fleece warm", k=1) == []


def test_opening_the_index_while_another_process_writes_keeps_its_document(
        tmp_path: Path, settings: RetrievalSettings) -> None:
    """Recovery on open removes pending documents (a crashed write's): it must not take another
    live process's write in progress for one."""
    writer = open_index(tmp_path / "index", settings)
    written, go = threading.Event(), threading.Event()
    real_write_vectors = writer._write_vectors

    def slow_write_vectors(chunks, vectors):  # type: ignore[no-untyped-def]
        real_write_vectors(chunks, vectors)
        written.set()  # the document is pending and its vectors are stored: the window of the race
        go.wait(timeout=30)

    writer._write_vectors = slow_write_vectors  # type: ignore[method-assign]
    results = []
    adding = threading.Thread(target=lambda: results.append(writer.add_file(write(tmp_path / "a.txt", ALPACA))))
    adding.start()
    assert written.wait(timeout=30)
    opened: list[HybridIndex] = []
    opening = threading.Thread(target=lambda: opened.append(open_index(tmp_path / "index", settings)))
    opening.start()
    time.sleep(1.0)  # the other process opens (and recovers) while the write is in progress
    go.set()
    adding.join(timeout=60)
    opening.join(timeout=60)
    [reader] = opened
    try:
        assert [r.status for r in results] == ["added"]
        for index in (writer, reader):
            assert [d.source for d in index.documents()] == ["a.txt"]
            assert [hit.chunk.source for hit in index.search("alpacas fleece warm", k=1, mode="dense")] == ["a.txt"]
    finally:
        writer.close()
        reader.close()


def test_both_processes_adding_the_same_file_keep_one_copy(tmp_path: Path, settings: RetrievalSettings) -> None:
    path = write(tmp_path / "alpaca.txt", ALPACA)
    with open_index(tmp_path / "index", settings) as first, open_index(tmp_path / "index", settings) as second:
        assert first.add_file(path).status == "added"
        again = second.add_file(path)  # its view predates the first's write
        assert (again.status, again.message) == ("unchanged", "already indexed")
        [doc] = second.documents()
        assert second._vectors.count() == doc.n_chunks


def test_both_processes_adding_files_at_once_lose_none(tmp_path: Path, settings: RetrievalSettings) -> None:
    files = [write(tmp_path / "alpaca.txt", ALPACA), write(tmp_path / "glacier.txt", GLACIER)]
    with open_index(tmp_path / "index", settings) as first, open_index(tmp_path / "index", settings) as second:
        results: dict[str, list] = {}
        threads = [threading.Thread(target=lambda i=i, index=index: results.setdefault(str(i), index.add_files(
            files, progress=False))) for i, index in enumerate((first, second))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        statuses = sorted(r.status for found in results.values() for r in found)
        assert statuses == ["added", "added", "unchanged", "unchanged"], results
        for index in (first, second):
            assert [d.source for d in index.documents()] == ["alpaca.txt", "glacier.txt"]
        assert first._vectors.count() == sum(d.n_chunks for d in first.documents())


def test_another_index_on_the_same_collection_is_refused(tmp_path: Path, settings: RetrievalSettings) -> None:
    """Opening reconciles Chroma with the docstore: a second index folder on the same collection
    would delete the first one's vectors as strays. It is refused with a message instead."""
    from retrieval.errors import RetrievalError

    with open_index(tmp_path / "index", settings) as first:
        first.add_file(write(tmp_path / "alpaca.txt", ALPACA))
        with pytest.raises(RetrievalError, match="belongs to another index"):
            open_index(tmp_path / "elsewhere", settings)
        assert [hit.chunk.source for hit in first.search("alpacas fleece warm", k=1, mode="dense")] == ["alpaca.txt"]
    with open_index(tmp_path / "elsewhere", replace(settings, collection=settings.collection + "-2")) as other:
        assert other.documents() == []


def test_an_index_with_local_vectors_open_in_another_process_is_refused(tmp_path: Path) -> None:
    """Chroma's store in the index folder serves one process: another one's searches failed inside
    Chroma ("Error creating hnsw segment reader"). It is refused with the way to share an index."""
    import subprocess
    import sys

    from retrieval.errors import RetrievalError
    from tests.retrieval_fixtures import REPO

    directory = tmp_path / "index"
    local = RetrievalSettings(chunk_tokens=64)
    script = f"""
import sys
from pathlib import Path
from retrieval.index import HybridIndex
from retrieval.types import RetrievalSettings
from tests.retrieval_fixtures import HashEmbedder, word_tokens
index = HybridIndex(Path({str(directory)!r}), RetrievalSettings(chunk_tokens=64), word_tokens, HashEmbedder())
print("open", flush=True)
sys.stdin.read()
"""
    other = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True)
    try:
        assert other.stdout is not None and other.stdout.readline().strip() == "open"
        with pytest.raises(RetrievalError, match=r"open in another process.*chroma run.*--chroma-url"):
            open_index(directory, local)
    finally:
        other.communicate(timeout=60)
    with open_index(directory, local) as index, open_index(directory, local) as again:  # one process: allowed
        index.add_file(write(tmp_path / "alpaca.txt", ALPACA))
        assert [d.source for d in again.documents()] == ["alpaca.txt"]


def test_a_write_left_pending_by_a_process_that_died_does_not_block_the_others(
        tmp_path: Path, settings: RetrievalSettings) -> None:
    """Recovery runs when an index is opened; a server that stays open must still get past what a
    process that shared the index left pending when it died."""
    from retrieval.chunking import chunk_pages
    from retrieval.docstore import StoredDocument
    from retrieval.index import _file_sha256
    from retrieval.readers import read_document

    path = write(tmp_path / "alpaca.txt", ALPACA)
    with open_index(tmp_path / "index", settings) as survivor, open_index(tmp_path / "index", settings) as died:
        # The other process's steps 2-3 of the write protocol for the same file, then its death.
        doc_id = died._doc_id(_file_sha256(path))
        chunks = chunk_pages(read_document(path, 10_000), doc_id, "alpaca.txt", word_tokens, 64)
        died._write_pending(StoredDocument(doc_id, "alpaca.txt", _file_sha256(path), 1, 10, ALPACA), chunks)
        died._write_vectors(chunks, HashEmbedder().embed_passages([c.text for c in chunks]))
        assert survivor.add_file(path).status == "added"
        [doc] = survivor.documents()
        assert survivor._docstore.pending() == [] and survivor._vectors.count() == doc.n_chunks
