"""HybridIndex: ingest, persistence, replacement, deletion, crash recovery, hostile input, threads.

These use HashEmbedder (no model) so they run in seconds; test_retrieval_real.py covers MiniLM.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from retrieval.chunking import chunk_pages
from retrieval.docstore import StoredDocument
from retrieval.errors import IngestError, RetrievalError
from retrieval.index import HybridIndex
from retrieval.readers import display_name, read_document
from retrieval.types import RetrievalSettings
from tests.retrieval_fixtures import REPO, HashEmbedder, hostile_files, text_pdf, word_tokens, write

SETTINGS = RetrievalSettings(chunk_tokens=64)

ALPACA = (
    "Alpacas are domesticated camelids from South America. Their fleece is soft and warm. "
    "Farmers shear alpacas once a year in spring."
)
GLACIER = (
    "Glaciers form where snow accumulates faster than it melts. Over centuries the snow compacts "
    "into dense blue ice that flows slowly downhill under its own weight."
)
VOLCANO = "Volcanoes erupt when magma rises through the crust. Basalt lava flows are runny and hot."


def open_index(directory: Path, settings: RetrievalSettings = SETTINGS) -> HybridIndex:
    return HybridIndex(directory, settings, word_tokens, HashEmbedder())  # type: ignore[arg-type]


@pytest.fixture
def index(tmp_path: Path) -> Iterator[HybridIndex]:
    with open_index(tmp_path / "index") as opened:
        yield opened


def vector_count(index: HybridIndex) -> int:
    return index._vectors.count()


def sources(index: HybridIndex, question: str, mode: str = "hybrid") -> list[str]:
    return [hit.chunk.source for hit in index.search(question, k=3, mode=mode)]


def test_add_search_and_list(index: HybridIndex, tmp_path: Path) -> None:
    result = index.add_file(write(tmp_path / "alpaca.txt", ALPACA))
    index.add_file(write(tmp_path / "glacier.md", "# Ice\n" + GLACIER))
    assert result.status == "added" and result.ok and result.n_chunks >= 1
    assert [d.source for d in index.documents()] == ["alpaca.txt", "glacier.md"]
    for mode in ("hybrid", "dense", "bm25"):
        assert sources(index, "when do farmers shear alpacas", mode)[0] == "alpaca.txt"
    hit = index.search("blue ice flows downhill")[0]
    assert hit.chunk.source == "glacier.md" and hit.chunk.section == "Ice"
    assert hit.dense_similarity is not None and hit.bm25_score is not None


def test_search_edge_cases(index: HybridIndex, tmp_path: Path) -> None:
    assert index.search("anything") == []  # empty index
    index.add_file(write(tmp_path / "alpaca.txt", ALPACA))
    assert index.search("   ") == []
    assert index.search("zzzz qqqq", mode="bm25") == []  # no shared word: BM25 scores <= 0 dropped
    with pytest.raises(ValueError):
        index.search("alpaca", mode="fuzzy")


def test_dense_hits_under_the_similarity_floor_are_dropped(tmp_path: Path) -> None:
    with open_index(tmp_path / "strict", RetrievalSettings(chunk_tokens=64, similarity_floor=0.99)) as strict:
        strict.add_file(write(tmp_path / "alpaca.txt", ALPACA))
        assert strict.search("alpacas fleece", mode="dense") == []
        assert strict.search("alpacas fleece", mode="bm25") != []


def test_dense_and_bm25_index_the_same_chunks(index: HybridIndex, tmp_path: Path) -> None:
    for name, text in (("a.txt", ALPACA * 5), ("g.txt", GLACIER * 5), ("v.txt", VOLCANO * 5)):
        index.add_file(write(tmp_path / name, text))
    chunk_ids = {c.chunk_id for d in index.documents() for c in index.chunks(d.doc_id)}
    assert set(index._vectors.chunk_ids_by_vector().values()) == chunk_ids
    assert {c.chunk_id for c in index._snapshot.lexical._chunks} == chunk_ids
    assert len(chunk_ids) == sum(d.n_chunks for d in index.documents()) > 3


def test_persistence_without_reingest(tmp_path: Path) -> None:
    directory = tmp_path / "index"
    files = [write(tmp_path / "alpaca.txt", ALPACA), write(tmp_path / "glacier.txt", GLACIER)]
    with open_index(directory) as index:
        index.add_files(files, progress=False)
        before = [(h.chunk.chunk_id, h.score) for h in index.search("snow compacts into ice")]
        fingerprint, docs = index.corpus_fingerprint(), index.documents()
    for path in files:
        path.unlink()  # reopening must not need the original files
    with open_index(directory) as index:
        assert [(h.chunk.chunk_id, h.score) for h in index.search("snow compacts into ice")] == before
        assert index.documents() == docs
        assert index.corpus_fingerprint() == fingerprint
        assert "compacts" in index.document_text(docs[1].doc_id)


def test_readding_an_unchanged_file_is_a_no_op(index: HybridIndex, tmp_path: Path) -> None:
    path = write(tmp_path / "alpaca.txt", ALPACA)
    first = index.add_file(path)
    count, fingerprint = vector_count(index), index.corpus_fingerprint()
    again = index.add_file(path)
    assert again.status == "unchanged" and again.doc_id == first.doc_id
    assert again.n_chunks == first.n_chunks
    assert vector_count(index) == count and index.corpus_fingerprint() == fingerprint
    copy = index.add_file(write(tmp_path / "copy.txt", ALPACA))
    assert copy.status == "unchanged" and "alpaca.txt" in copy.message


def test_new_content_under_the_same_name_replaces_the_old_version(index: HybridIndex, tmp_path: Path) -> None:
    path = write(tmp_path / "notes.txt", ALPACA)
    old = index.add_file(path)
    fingerprint = index.corpus_fingerprint()
    write(path, VOLCANO)
    new = index.add_file(path)
    assert new.status == "added" and "replaced" in new.message and new.doc_id != old.doc_id
    assert [d.doc_id for d in index.documents()] == [new.doc_id]
    assert sources(index, "alpacas fleece shear", "bm25") == []
    assert sources(index, "magma basalt lava")[0] == "notes.txt"
    assert vector_count(index) == new.n_chunks
    assert index.corpus_fingerprint() != fingerprint


def test_changing_chunk_size_rechunks_on_readd(tmp_path: Path) -> None:
    path = write(tmp_path / "glacier.txt", GLACIER * 20)
    with open_index(tmp_path / "index", RetrievalSettings(chunk_tokens=64)) as index:
        small = index.add_file(path)
    with open_index(tmp_path / "index", RetrievalSettings(chunk_tokens=256)) as index:
        large = index.add_file(path)
        assert large.status == "added" and large.n_chunks < small.n_chunks
        assert len(index.documents()) == 1


def test_delete_by_id_or_name(index: HybridIndex, tmp_path: Path) -> None:
    alpaca = index.add_file(write(tmp_path / "alpaca.txt", ALPACA))
    index.add_file(write(tmp_path / "glacier.txt", GLACIER))
    fingerprint, tokens = index.corpus_fingerprint(), index.total_tokens()
    assert index.delete("glacier.txt") is True
    assert [d.source for d in index.documents()] == ["alpaca.txt"]
    assert "glacier.txt" not in sources(index, "glaciers snow ice")
    assert index.corpus_fingerprint() != fingerprint and index.total_tokens() < tokens
    assert index.delete("glacier.txt") is False
    assert index.delete(alpaca.doc_id or "") is True
    assert index.documents() == [] and vector_count(index) == 0 and index.total_tokens() == 0
    with pytest.raises(RetrievalError):
        index.document_text(alpaca.doc_id or "")


@pytest.mark.parametrize(
    "case",
    ["unsupported", "empty", "encrypted", "truncated", "binary_pdf", "scanned", "zero_pages", "not_utf8",
     "binary_txt", "docx_not_zip", "docx_bad_zip"],
)
def test_hostile_input_leaves_the_index_intact(index: HybridIndex, tmp_path: Path, case: str) -> None:
    index.add_file(write(tmp_path / "alpaca.txt", ALPACA))
    before = (index.documents(), vector_count(index), index.corpus_fingerprint())
    path, expected = hostile_files(tmp_path / "bad")[case]
    with pytest.raises(IngestError, match=re.escape(expected)):
        index.add_file(path)
    [result] = index.add_files([path], progress=False)
    assert result.status == "error" and expected in result.message and not result.ok
    assert (index.documents(), vector_count(index), index.corpus_fingerprint()) == before
    assert sources(index, "farmers shear alpacas")[0] == "alpaca.txt"


def test_hostile_file_replacing_a_good_one_keeps_the_good_one(index: HybridIndex, tmp_path: Path) -> None:
    path = write(tmp_path / "report.pdf", text_pdf(["Quarterly alpaca fleece report"]))
    index.add_file(path)
    write(path, b"%PDF-1.4\n garbage that is not really a pdf")
    with pytest.raises(IngestError):
        index.add_file(path)
    assert sources(index, "alpaca fleece report") == ["report.pdf"]


def test_add_files_expands_folders_and_carries_on(index: HybridIndex, tmp_path: Path) -> None:
    folder = tmp_path / "docs"
    write(folder / "a.txt", ALPACA)
    write(folder / "sub" / "g.md", GLACIER)
    write(folder / "broken.pdf", b"not a pdf at all")
    write(folder / "ignored.xyz", "unsupported files in folders are skipped")
    write(folder / ".hidden" / "v.txt", VOLCANO)
    results = index.add_files([folder], progress=False)
    assert [(r.source, r.status) for r in results] == [
        ("a.txt", "added"), ("broken.pdf", "error"), ("g.md", "added")
    ]


def test_unsafe_names_are_sanitised_and_nothing_is_written_outside(tmp_path: Path) -> None:
    inputs = tmp_path / "in"
    weird = write(inputs / "evil\x1b[31m\nname\u202e.txt", ALPACA)
    plain = write(inputs / "plain.txt", GLACIER)
    before = sorted(p for p in tmp_path.rglob("*"))
    with open_index(tmp_path / "index") as index:
        assert index.add_file(weird).source == "evil[31mname.txt"
        assert index.add_file(plain, source="../../../etc/passwd").source == "passwd"
        assert index.add_file(write(inputs / "v.txt", VOLCANO), source="..\\..\\boot.ini").source == "boot.ini"
        assert sorted(d.source for d in index.documents()) == ["boot.ini", "evil[31mname.txt", "passwd"]
        [bad] = index.add_files([write(inputs / "bad\nname\r.pdf", b"junk")], progress=False)
        assert bad.status == "error" and bad.message.startswith("badname.pdf: not a PDF")
        assert "\n" not in bad.message and "\r" not in bad.message
    after = sorted(p for p in tmp_path.rglob("*") if not p.is_relative_to(tmp_path / "index"))
    assert after == sorted([*before, inputs / "v.txt", inputs / "bad\nname\r.pdf"])
    assert {p.name for p in (tmp_path / "index").iterdir()} <= {
        "chroma", "chroma.lock", "docstore.sqlite", "docstore.sqlite-wal", "docstore.sqlite-shm", "write.lock"
    }


def test_display_name() -> None:
    assert display_name("a/b/../c.pdf") == "c.pdf"
    assert display_name("..") == "document"
    assert display_name("\x00\x07") == "document"
    assert display_name("tab\tand  spaces .txt") == "taband spaces .txt"
    assert len(display_name("x" * 1000)) == 200


def test_write_failure_in_chroma_leaves_nothing_behind(
    index: HybridIndex, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    index.add_file(write(tmp_path / "alpaca.txt", ALPACA))
    before = (index.documents(), vector_count(index))
    real_upsert = index._vectors.upsert

    def half_then_fail(chunk_ids, doc_ids, vectors) -> None:  # type: ignore[no-untyped-def]
        real_upsert(chunk_ids[:1], doc_ids[:1], vectors[:1])  # some vectors land, then the store fails
        raise RuntimeError("disk full")

    monkeypatch.setattr(index._vectors, "upsert", half_then_fail)
    with pytest.raises(IngestError, match=r"glacier.txt: could not be written to the index.*disk full"):
        index.add_file(write(tmp_path / "glacier.txt", GLACIER * 10))
    assert (index.documents(), vector_count(index)) == before
    assert index._docstore.pending() == []


def test_pending_document_left_by_a_crash_is_cleaned_on_open(tmp_path: Path) -> None:
    directory = tmp_path / "index"
    with open_index(directory) as index:
        index.add_file(write(tmp_path / "alpaca.txt", ALPACA))
        good = (index.documents(), vector_count(index))
        # Steps 2-3 of the write protocol, stopping before 'complete' as a crash would.
        path = write(tmp_path / "glacier.txt", GLACIER)
        document = StoredDocument("crashed-doc", "glacier.txt", "0" * 64, 1, 10, GLACIER)
        chunks = chunk_pages(read_document(path, 10_000), "crashed-doc", "glacier.txt", word_tokens, 64)
        index._write_pending(document, chunks)
        index._write_vectors(chunks, HashEmbedder().embed_passages([c.text for c in chunks]))
        assert index._docstore.pending() == ["crashed-doc"]
    with open_index(directory) as index:
        assert (index.documents(), vector_count(index)) == good
        assert index._docstore.pending() == []


def test_sigkill_mid_ingest_of_a_folder_then_resume(tmp_path: Path) -> None:
    folder = tmp_path / "docs"
    for i, text in enumerate((ALPACA, GLACIER, VOLCANO)):
        write(folder / f"{i}.txt", text)
    directory = tmp_path / "index"
    # The child dies by SIGKILL inside the second document's write, after its vectors are in Chroma
    # and before it is marked complete: the worst moment for consistency.
    script = f"""
import os, signal
from pathlib import Path
from tests.retrieval_fixtures import HashEmbedder, word_tokens
from retrieval.index import HybridIndex
from retrieval.types import RetrievalSettings
index = HybridIndex(Path({str(directory)!r}), RetrievalSettings(chunk_tokens=64), word_tokens, HashEmbedder())
real = index._mark_complete
calls = []
def complete_once_then_die(doc_id, replaces):
    calls.append(doc_id)
    if len(calls) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    real(doc_id, replaces)
index._mark_complete = complete_once_then_die
index.add_files([Path({str(folder)!r})], progress=False)
"""
    child = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, timeout=120)
    assert child.returncode == -signal.SIGKILL, child.stderr.decode()[-2000:]
    with open_index(directory) as index:
        assert [d.source for d in index.documents()] == ["0.txt"]
        assert vector_count(index) == index.documents()[0].n_chunks
        assert index._docstore.pending() == []
        assert sources(index, "glaciers blue ice", "bm25") == []
        results = index.add_files([folder], progress=False)
        assert [r.status for r in results] == ["unchanged", "added", "added"]
        assert vector_count(index) == sum(d.n_chunks for d in index.documents())


def test_lost_chroma_folder_is_rebuilt_from_the_docstore(tmp_path: Path) -> None:
    import shutil

    directory = tmp_path / "index"
    with open_index(directory) as index:
        index.add_file(write(tmp_path / "glacier.txt", GLACIER))
        expected = [h.chunk.chunk_id for h in index.search("snow ice", mode="dense")]
    shutil.rmtree(directory / "chroma")
    with open_index(directory) as index:
        assert [h.chunk.chunk_id for h in index.search("snow ice", mode="dense")] == expected


def test_concurrent_searches_during_writes(index: HybridIndex, tmp_path: Path) -> None:
    index.add_file(write(tmp_path / "alpaca.txt", ALPACA))
    errors: list[BaseException] = []
    stop = threading.Event()
    names = {"alpaca.txt"} | {f"{kind}{i}.txt" for kind in "gv" for i in range(4)}

    def reader() -> None:
        try:
            while not stop.is_set():
                hits = index.search("alpacas glaciers volcanoes")
                assert hits and len({h.chunk.chunk_id for h in hits}) == len(hits)
                assert {h.chunk.source for h in hits} <= names
                index.documents()
        except BaseException as exc:  # surfaced below: a thread's failure must fail the test
            errors.append(exc)

    readers = [threading.Thread(target=reader) for _ in range(3)]
    for thread in readers:
        thread.start()
    try:
        for i in range(4):
            index.add_file(write(tmp_path / f"g{i}.txt", f"{GLACIER} Variant {i}."))
            index.add_file(write(tmp_path / f"v{i}.txt", f"{VOLCANO} Variant {i}."))
            index.delete(f"g{i}.txt")
    finally:
        stop.set()
        for thread in readers:
            thread.join()
    assert errors == []
    assert [d.source for d in index.documents()] == ["alpaca.txt", "v0.txt", "v1.txt", "v2.txt", "v3.txt"]


def test_chroma_collection_name_is_checked(tmp_path: Path) -> None:
    with pytest.raises(RetrievalError, match="collection name"):
        open_index(tmp_path / "i", RetrievalSettings(collection="x"))
