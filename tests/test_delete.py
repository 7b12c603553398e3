"""Deleting a document leaves no byte of it on disk besides the index's SQLite row history, and the
chunk-KV store stays bounded (tiny models)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch

from app.chunk_kv import OWNER_FILE, ChunkKV, Passage
from app.config import Limits
from app.pipeline import answer_once
from decoding.settings import DecodingSettings
from tests.test_windows_engine import QUESTIONS, TOPICS, make_engine
from tests.tiny import tiny_model
from ui.uploads import ingest_uploads

SQLITE = ("docstore.sqlite", "chroma.sqlite3")  # row history: freed pages may keep old bytes
TIMINGS = "lc_reference.json"  # LC decode speeds, no document content


def files(root: Path) -> dict[str, str]:
    """Every file under root but the SQLite databases (and their journals), with its content's hash."""
    found = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = Path(folder) / name
            if not name.startswith(SQLITE) and name != TIMINGS:
                found[path.relative_to(root).as_posix()] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def upload(engine, index, tmp_path: Path, name: str) -> None:  # type: ignore[no-untyped-def]
    source = tmp_path / "browser" / name
    source.parent.mkdir(exist_ok=True)
    source.write_text(" ".join([TOPICS[name]] * 2))
    lines = ingest_uploads(index, [source], engine.settings.uploads_dir, Limits())
    assert [line.status for line in lines] == ["added"]
    engine.prepare(index)
    for method in ("lc", "sd", "rapid"):  # the target's and the SD drafter's prefixes, the drafter's chunk KV
        answer_once(engine, QUESTIONS[name], index, DecodingSettings(method=method, max_new_tokens=6, gamma=3))


@pytest.mark.timeout(600)
def test_delete_leaves_no_byte_of_the_document_on_disk(tmp_path: Path) -> None:
    engine = make_engine(tmp_path / "home")
    index = engine.open_index(tmp_path / "home" / "index")
    upload(engine, index, tmp_path, "alpaca.txt")  # stays: its files must be left as they are
    before = files(tmp_path / "home")
    upload(engine, index, tmp_path, "orchid.txt")
    added = set(files(tmp_path / "home")) - set(before)
    assert "uploads/orchid.txt" in added
    assert any(p.startswith("kv/") for p in added) and any("/chunk_kv/" in f"/{p}" for p in added)

    assert engine.delete(index, "orchid.txt")
    after = files(tmp_path / "home")
    assert after == before, {"left": sorted(set(after) - set(before)), "changed": sorted(
        p for p in set(after) & set(before) if after[p] != before[p]), "gone": sorted(set(before) - set(after))}
    assert [d.source for d in index.documents()] == ["alpaca.txt"]
    done = answer_once(engine, QUESTIONS["alpaca.txt"], index, DecodingSettings(method="lc", max_new_tokens=4))
    assert done.stats.prefix_cached_tokens > 0  # the remaining document's cached prefix was kept
    index.close()


def _passages(n: int) -> list[Passage]:
    return [Passage(f"doc-{i:06d}", list(range(10 + i, 40 + i))) for i in range(n)]


def test_chunk_kv_store_is_bounded_least_recently_read_first(tmp_path: Path) -> None:
    model = tiny_model(2).model
    store = ChunkKV(tmp_path, model, "a" * 64, [1, 2, 3], owner="tiny")
    passages = _passages(6)
    store.build(passages[:1])
    size = next(store.store.directory.glob("*.safetensors")).stat().st_size
    bounded = ChunkKV(tmp_path, model, "a" * 64, [1, 2, 3], owner="tiny", max_bytes=int(size * 3.5))
    bounded.build(passages[1:3])
    bounded.piece(passages[0])  # read: the most recent now
    bounded.build(passages[3:4])
    assert bounded.missing(passages[:4]) == [passages[1]]  # the least recently read one went
    bounded.build(passages[4:6])
    assert len(list(bounded.store.directory.glob("*.safetensors"))) == 3
    with torch.inference_mode():
        assert bounded.piece(passages[1]) is not None  # an evicted chunk is encoded again when read


def test_opening_a_store_removes_its_drafters_stale_stamps_and_old_files(tmp_path: Path) -> None:
    model = tiny_model(2).model
    old = ChunkKV(tmp_path, model, "a" * 64, [1, 2, 3], owner="tiny-drafter")
    old.build(_passages(2))
    other = ChunkKV(tmp_path, model, "b" * 64, [1, 2, 3], owner="tiny-target")  # another model: kept
    other.build(_passages(1))
    unowned = tmp_path / "chunk_kv" / ("c" * 32)  # written before owners were recorded
    unowned.mkdir()
    (unowned / "doc-000000.0123456789abcdef.safetensors").write_bytes(b"x")
    new = ChunkKV(tmp_path, model, "d" * 64, [1, 2, 3], owner="tiny-drafter")  # the engine's code changed
    folders = sorted(p.name for p in (tmp_path / "chunk_kv").iterdir())
    assert folders == sorted(["b" * 32, "d" * 32])
    assert (tmp_path / "chunk_kv" / ("d" * 32) / OWNER_FILE).read_text() == "tiny-drafter"
    new.build(_passages(2))
    (new.store.directory / "doc-000000.ffffffffffffffff.safetensors").write_bytes(b"old naming")
    assert new.keep_only(_passages(1)) == 1  # the old-named one; another chunk's file is prune's
    assert sorted(new.store.names()) == sorted(new.name(p) for p in _passages(2))
