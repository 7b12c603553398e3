"""The drafter prompt's header KV is stored with the chunks' at ingest, so a question's process reads
it instead of running the drafter over the header before its first draft."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import app.chunk_kv as chunk_kv_module
from app.chunk_kv import ChunkKV, Passage, prune
from tests.tiny import tiny_model

HEADER = [1, 2, 3, 4, 5]


def passages(n: int) -> list[Passage]:
    return [Passage(f"doc-{i:06d}", list(range(10 + i, 40 + i))) for i in range(n)]


def test_a_new_process_reads_the_header_kv_stored_at_ingest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_model(2).model
    with torch.inference_mode():
        ChunkKV(tmp_path, model, "a" * 64, HEADER, owner="tiny").build(passages(2))
        built = chunk_kv_module.encode_piece(model, HEADER)
    encoded: list[int] = []
    real = chunk_kv_module.encode_piece

    def counting(model, tokens, after=(), run=None):  # type: ignore[no-untyped-def]
        encoded.append(len(tokens))
        return real(model, tokens, after=after, run=run)

    monkeypatch.setattr(chunk_kv_module, "encode_piece", counting)
    later = ChunkKV(tmp_path, model, "a" * 64, HEADER, owner="tiny")  # a question's process
    with torch.inference_mode():
        header = later.header_kv()
    assert encoded == [], "the header was encoded again"
    assert header.keys() == built.keys()
    for name, tensor in built.items():
        assert torch.equal(header[name], tensor), name  # the very bits a fresh encoding gives
    # Apart from the chunks: not listed, not pruned with them.
    assert sorted(later.store.names()) == sorted(later.name(p) for p in passages(2))
    prune(tmp_path, lambda: set())
    assert later.store.names() == []
    with torch.inference_mode():
        ChunkKV(tmp_path, model, "a" * 64, HEADER, owner="tiny").header_kv()
    assert encoded == []


def test_another_header_is_encoded(tmp_path: Path) -> None:
    model = tiny_model(2).model
    with torch.inference_mode():
        ChunkKV(tmp_path, model, "a" * 64, HEADER, owner="tiny").build(passages(1))
        other = ChunkKV(tmp_path, model, "a" * 64, [9, 8, 7], owner="tiny").header_kv()
        fresh = chunk_kv_module.encode_piece(model, [9, 8, 7])
    for name, tensor in fresh.items():
        assert torch.equal(other[name], tensor), name
