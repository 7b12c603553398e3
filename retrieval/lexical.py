"""The lexical side: BM25 (Okapi) over chunk texts, rebuilt from the docstore, never persisted."""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Sequence

import numpy as np
from rank_bm25 import BM25Okapi

from retrieval.types import Chunk

_WORD = re.compile(r"\w+")
# Question words carry no topic; left in, they reward chunks that merely contain "what" or "how".
_STOPWORDS = frozenset((
    "a", "an", "and", "are", "as", "at", "be", "but", "by", "can", "do", "does", "for", "from", "how",
    "i", "if", "in", "into", "is", "it", "its", "me", "my", "of", "on", "or", "should", "so", "than",
    "that", "the", "their", "then", "there", "these", "this", "those", "to", "was", "were", "what",
    "when", "where", "which", "who", "whom", "why", "will", "with", "would", "you", "your",
))


def bm25_tokens(text: str) -> list[str]:
    return [word for word in _WORD.findall(text.lower()) if word not in _STOPWORDS]


class _LuceneIdfBM25(BM25Okapi):
    """Okapi BM25 scoring with Lucene's idf, log(1 + (N - n + 0.5) / (n + 0.5)), which is always
    positive. Okapi's own idf is zero or negative for a word in half or more of the chunks, so a
    corpus of one or two short documents (a typical first upload) would match nothing at all."""

    def _calc_idf(self, nd: dict[str, int]) -> None:
        for word, freq in nd.items():
            self.idf[word] = math.log(1 + (self.corpus_size - freq + 0.5) / (freq + 0.5))


class LexicalIndex:
    """BM25 over a fixed list of chunks. Built on first search: ingesting many files in a row
    then costs one build instead of one per file. Safe to search from several threads."""

    def __init__(self, chunks: Sequence[Chunk]) -> None:
        self._chunks = chunks
        self._bm25: BM25Okapi | None = None
        self._lock = threading.Lock()

    def search(self, question: str, n: int) -> list[tuple[Chunk, float]]:
        """Best n chunks with a positive score, best first (ties keep document order)."""
        terms = bm25_tokens(question)
        bm25 = self._model()
        if not terms or bm25 is None or n < 1:
            return []
        scores = bm25.get_scores(terms)
        best = np.argsort(-scores, kind="stable")[:n]
        return [(self._chunks[i], float(scores[i])) for i in best if scores[i] > 0]

    def _model(self) -> BM25Okapi | None:
        with self._lock:
            if self._bm25 is None:
                corpus = [bm25_tokens(chunk.text) for chunk in self._chunks]
                # BM25Okapi divides by the mean chunk length: an all-empty corpus has nothing to find.
                if any(corpus):
                    self._bm25 = _LuceneIdfBM25(corpus)
            return self._bm25
