"""Retrieval quality on labelled questions: recall@k by page, shared by the tests and the bench."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from retrieval.index import HybridIndex


@dataclass(frozen=True)
class Label:
    question: str
    source: str  # document name as indexed (file name)
    page: int  # 1-based page that holds the answer
    answer_substring: str  # verbatim text from that page


def load_labels(path: Path) -> list[Label]:
    with Path(path).open(encoding="utf-8") as handle:
        return [Label(**json.loads(line)) for line in handle if line.strip()]


def recall_at_k(index: HybridIndex, labels: list[Label], k: int, mode: str) -> float:
    """Share of questions with a chunk from the labelled page among the top k hits."""
    if not labels:
        raise ValueError("no labels to evaluate")
    found = sum(1 for label in labels if _hit(index, label, k, mode))
    return found / len(labels)


def _hit(index: HybridIndex, label: Label, k: int, mode: str) -> bool:
    return any(
        hit.chunk.source == label.source and hit.chunk.page == label.page
        for hit in index.search(label.question, k=k, mode=mode)
    )
