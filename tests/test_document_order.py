"""The long context keeps documents in ingest order, so a new document extends its cached prefix."""

from __future__ import annotations

import time
from pathlib import Path

from retrieval.context import build_contexts, long_documents
from retrieval.index import HybridIndex
from retrieval.types import RetrievalSettings
from tests.retrieval_fixtures import HashEmbedder, word_tokens, write


def test_long_context_follows_ingest_order_listings_stay_by_name(tmp_path: Path) -> None:
    settings = RetrievalSettings(chunk_tokens=40, budget_min_tokens=60, budget_fraction=0.0)
    with HybridIndex(tmp_path / "index", settings, word_tokens, HashEmbedder()) as index:  # type: ignore[arg-type]
        for name in ("zebra.txt", "apple.txt", "mango.txt"):
            index.add_file(write(tmp_path / name, f"All about the {name[:-4]}. " * 5))
            time.sleep(0.01)  # distinct ingest times
        assert [d.source for d in index.documents()] == ["apple.txt", "mango.txt", "zebra.txt"]
        assert [d.source for d in index.documents(in_ingest_order=True)] == ["zebra.txt", "apple.txt", "mango.txt"]
        before = long_documents(index)
        index.add_file(write(tmp_path / "banana.txt", "All about the banana. " * 5))
        after = long_documents(index)
        assert after[:3] == before and after[3].startswith("### Document: banana.txt\n")
        contexts = build_contexts(index, "banana", settings, word_tokens, 100_000)
        assert contexts.long_documents == after
        assert contexts.long_context == "\n\n".join(after)
        assert len(contexts.rag_passages) == len(contexts.rag_chunk_ids) > 0
        index.delete("apple.txt")
        assert long_documents(index) == [after[0], *after[2:]]
