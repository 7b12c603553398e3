"""Chunk KV on an index that several processes share (two `ask serve` on one corpus): no process
deletes a file that another one may be using (tiny model). Each ChunkKV here stands for one process."""

from __future__ import annotations

import pathlib
from pathlib import Path

import pytest

from app.chunk_kv import CHUNK_KV_DIR, OWNER_FILE, ChunkKV, Passage, prune
from tests.tiny import tiny_model

HEADER = [1, 2, 3]


def _passages(n: int) -> list[Passage]:
    return [Passage(f"doc-{i:06d}", list(range(10 + i, 40 + i))) for i in range(n)]


def test_keep_only_leaves_the_files_of_chunks_it_was_not_given(tmp_path: Path) -> None:
    """Another process has just added a document and built its chunks' KV: this process's list of
    passages predates it, and those files must stay."""
    model = tiny_model(2).model
    theirs = ChunkKV(tmp_path, model, "a" * 64, HEADER, owner="tiny")
    theirs.build(_passages(2))
    ours = ChunkKV(tmp_path, model, "a" * 64, HEADER, owner="tiny")
    assert ours.keep_only(_passages(1)) == 0
    assert ours.missing(_passages(2)) == []


def test_prune_reads_the_live_chunks_after_listing_the_files(tmp_path: Path) -> None:
    folder = tmp_path / CHUNK_KV_DIR / "drafter"
    folder.mkdir(parents=True)
    for name in ("doc1-000000.aa", "doc2-000000.bb"):  # doc2: another process's document, just added
        (folder / f"{name}.safetensors").write_bytes(b"")

    def live() -> set[str]:
        # Written after the listing: not considered, even though its chunk is not live (yet).
        (folder / "doc3-000000.cc.safetensors").write_bytes(b"")
        return {"doc2-000000"}

    assert prune(tmp_path, live) == 1
    assert sorted(p.name for p in folder.glob("*.safetensors")) == [
        "doc2-000000.bb.safetensors", "doc3-000000.cc.safetensors"]


def test_a_new_store_is_never_seen_without_its_owner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Opening a store removes ownerless sibling folders (older versions'): another process opening
    its store while this one creates its folder must not find it ownerless and remove it."""
    model = tiny_model(2).model
    ChunkKV(tmp_path, model, "b" * 64, HEADER, owner="other").build(_passages(1))  # chunk_kv/ exists
    real_write_text = pathlib.Path.write_text
    opened: list[bool] = []

    def write_text(self: Path, data: str, *args, **kwargs) -> int:  # type: ignore[no-untyped-def]
        if self.name == OWNER_FILE and data == "ours" and not opened:  # the other process opens its store now
            opened.append(True)
            ChunkKV(tmp_path, model, "c" * 64, HEADER, owner="another")
        return real_write_text(self, data, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "write_text", write_text)
    ours = ChunkKV(tmp_path, model, "a" * 64, HEADER, owner="ours")  # chunk_kv/ exists: it claims its folder now
    ours.build(_passages(2))
    assert opened
    assert (ours.store.directory / OWNER_FILE).read_text() == "ours"
    assert ours.missing(_passages(2)) == []
    assert not [p for p in (tmp_path / CHUNK_KV_DIR).iterdir() if p.name.startswith(".")]


def test_a_file_another_process_evicted_is_a_miss(tmp_path: Path) -> None:
    """Another process sharing the KV folder evicts or forgets a file this one is about to read:
    the prefix is then not cached (prefilled again) and the passage is encoded again, never an error."""
    import torch

    from decoding.prefix_cache import PrefixCache
    from tests.tiny import random_prompt

    model = tiny_model(1)
    prompt = random_prompt(60, seed=3)
    prefix, cuts = prompt.prefix, prompt.cuts()
    cache = model.model.new_cache(len(prefix) + 8)
    model.model.prefill(torch.tensor(prefix), cache)
    ours, theirs = PrefixCache(tmp_path / "kv", {}), PrefixCache(tmp_path / "kv", {})
    theirs.save(model.model, prefix, cache, cuts)
    assert ours.contains(model.model, prefix)
    for path in (tmp_path / "kv").glob("*.safetensors"):
        path.unlink()  # their eviction, between our listing and our read
    assert ours.load(model.model, prefix, len(prefix) + 8) is None
    assert ours.longest(model.model, prefix, cuts, len(prefix) + 8) is None

    store = ChunkKV(tmp_path, model.model, "a" * 64, HEADER, owner="tiny")
    store.build(_passages(1))
    for path in store.store.directory.glob("*.safetensors"):
        path.unlink()
    with torch.inference_mode():
        assert store.piece(_passages(1)[0]) is not None
    assert store.missing(_passages(1)) == []
