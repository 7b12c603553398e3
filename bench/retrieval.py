"""Retrieval benchmark: ingest speed on the sample PDFs, recall@5, search latency at ~1K and ~10K chunks.

    python -m bench.retrieval [--threads 1] [--sizes 1000 10000] [--repeat 2]

The scale corpora are synthetic documents of sentences recombined from the sample PDFs, ingested
through HybridIndex.add_file with small chunks. So that 10K chunks build in seconds on two cores,
their chunk vectors are the mean of cached MiniLM sentence vectors (SentencePoolEmbedder below);
query embedding, Chroma and BM25 are the production code paths, so the latencies are real.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from app.machine import cpu_name
from app.reexports import Embedder, HybridIndex, Label, RetrievalSettings, load_labels, read_document, recall_at_k

REPO = Path(__file__).resolve().parents[1]
PDFS = (REPO / "data" / "R-data.pdf", REPO / "tests" / "fixtures" / "R-FAQ.pdf")
LABELS = REPO / "data" / "retrieval_labels.jsonl"
MODES = ("hybrid", "dense", "bm25")
_SENTENCE = re.compile(r"(?<=[.!?])\s+")
Tokenize = Callable[[str], Sequence[int]]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own choice)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000], help="chunk counts to reach")
    parser.add_argument("--repeat", type=int, default=2, help="passes over the labelled questions per size")
    parser.add_argument("--chunk-tokens", type=int, default=48, help="chunk size for the scale corpora")
    args = parser.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    tokenize, tokenizer_name = load_tokenizer()
    embedder = Embedder()
    labels = load_labels(LABELS)
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores, "
          f"torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}")
    print(f"tokenizer: {tokenizer_name}; embedder: {embedder.name}")

    with tempfile.TemporaryDirectory(prefix="rapidqa-bench-") as tmp:
        started = time.perf_counter()
        embedder.embed(["warm-up"])
        print(f"embedder load: {time.perf_counter() - started:.1f} s\n")
        ingest_pdfs(Path(tmp) / "pdfs", tokenize, embedder, labels)
        scale(Path(tmp) / "scale", tokenize, embedder, labels, args)
    return 0


def load_tokenizer() -> tuple[Tokenize, str]:
    """The drafter's real tokenizer when the app has fetched it, else a word splitter."""
    home = Path(os.environ.get("RAPIDQA_HOME", Path.home() / ".cache" / "rapidqa")).expanduser()
    path = home / "models" / "qwen2.5-coder-0.5b" / "tokenizer.json"
    if path.is_file():
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(path))
        return (lambda text: tokenizer.encode(text, add_special_tokens=False).ids), f"Qwen2.5 ({path})"
    words = re.compile(r"\w+|[^\w\s]")
    return words.findall, "word splitter (Qwen tokenizer not found; set RAPIDQA_HOME)"


def ingest_pdfs(directory: Path, tokenize: Tokenize, embedder: Embedder, labels: list[Label]) -> None:
    settings = RetrievalSettings()
    pages = 0
    started = time.perf_counter()
    for path in PDFS:
        pages += len(read_document(path, settings.max_file_bytes))
    read_s = time.perf_counter() - started
    with HybridIndex(directory, settings, tokenize, embedder) as index:
        started = time.perf_counter()
        results = index.add_files(PDFS, progress=False)
        total_s = time.perf_counter() - started
        chunks = sum(r.n_chunks for r in results)
        print(f"ingest, sample PDFs ({pages} pages, {chunks} chunks of <= {settings.chunk_tokens} tokens):")
        print(f"  read only     {pages / read_s:7.1f} pages/s")
        print(f"  end to end    {pages / total_s:7.1f} pages/s   ({total_s:.1f} s: read, chunk, embed, store)")
        recall = {mode: recall_at_k(index, labels, 5, mode) for mode in MODES}
        print(f"recall@5 on {len(labels)} labelled questions: "
              + ", ".join(f"{mode} {value:.3f}" for mode, value in recall.items()) + "\n")


def scale(directory: Path, tokenize: Tokenize, embedder: Embedder, labels: list[Label],
          args: argparse.Namespace) -> None:
    settings = RetrievalSettings(chunk_tokens=args.chunk_tokens)
    sentences = sentence_pool()
    pool_embedder = SentencePoolEmbedder(embedder)
    started = time.perf_counter()
    pool_embedder.prime(sentences)
    print(f"sentence pool: {len(sentences)} sentences embedded in {time.perf_counter() - started:.1f} s")
    rng = random.Random(0)
    rows = []
    with HybridIndex(directory, settings, tokenize, pool_embedder) as index:  # type: ignore[arg-type]
        n_docs = 0
        for target in sorted(args.sizes):
            started = time.perf_counter()
            while sum(d.n_chunks for d in index.documents()) < target:
                path = directory.parent / "docs" / f"synthetic-{n_docs:05d}.txt"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(synthetic_document(rng, sentences), encoding="utf-8")
                index.add_file(path)
                n_docs += 1
            ingest_s = time.perf_counter() - started
            started = time.perf_counter()
            index.search("warm up the BM25 model", mode="bm25")
            bm25_build_s = time.perf_counter() - started
            n_chunks = sum(d.n_chunks for d in index.documents())
            latencies = {mode: latency(index, labels, mode, args.repeat) for mode in MODES}
            rows.append((n_chunks, len(index.documents()), ingest_s, bm25_build_s, latencies))
    print_table(rows, args.chunk_tokens)


def latency(index: HybridIndex, labels: list[Label], mode: str, repeat: int) -> list[float]:
    timings = []
    for _ in range(repeat):
        for label in labels:
            started = time.perf_counter()
            index.search(label.question, mode=mode)
            timings.append(time.perf_counter() - started)
    return timings


def print_table(rows: list[tuple[int, int, float, float, dict[str, list[float]]]], chunk_tokens: int) -> None:
    print(f"\nsearch latency (ms), synthetic corpora, chunks of <= {chunk_tokens} tokens, k = all candidates:")
    header = f"{'chunks':>7} {'docs':>5} {'ingest s':>9} {'bm25 build':>10}"
    for mode in MODES:
        header += f" {mode + ' p50':>11} {mode + ' p95':>11}"
    print(header)
    for n_chunks, n_docs, ingest_s, build_s, latencies in rows:
        line = f"{n_chunks:>7} {n_docs:>5} {ingest_s:>9.1f} {build_s * 1000:>8.0f}ms"
        for mode in MODES:
            values = sorted(latencies[mode])
            p50 = statistics.median(values) * 1000
            p95 = values[min(len(values) - 1, round(0.95 * (len(values) - 1)))] * 1000
            line += f" {p50:>11.1f} {p95:>11.1f}"
        print(line)
    print("(ingest s for the synthetic corpora uses cached sentence vectors, not a full embedding pass)")


def sentence_pool() -> list[str]:
    """Distinct prose sentences from the sample PDFs (code lines and tables left out)."""
    seen: dict[str, None] = {}
    for path in PDFS:
        for page in read_document(path, 50_000_000):
            for sentence in _SENTENCE.split(" ".join(page.text.split())):
                words = sentence.split()
                if 6 <= len(words) <= 40 and sentence[0].isupper() and sentence.endswith("."):
                    seen.setdefault(sentence, None)
    return list(seen)


def synthetic_document(rng: random.Random, sentences: list[str]) -> str:
    paragraphs = [" ".join(rng.sample(sentences, rng.randint(3, 7))) for _ in range(rng.randint(8, 20))]
    return "\n\n".join(paragraphs)


class SentencePoolEmbedder:
    """Passages get the mean of their sentences' MiniLM vectors, cached; queries go to MiniLM."""

    def __init__(self, embedder: Embedder) -> None:
        self._embedder = embedder
        self._cache: dict[str, np.ndarray] = {}
        self.name = embedder.name

    def prime(self, sentences: list[str]) -> None:
        missing = [s for s in sentences if s not in self._cache]
        for sentence, vector in zip(missing, self._embedder.embed(missing), strict=True):
            self._cache[sentence] = np.asarray(vector)

    def embed_query(self, text: str) -> list[float]:
        return self._embedder.embed_query(text)

    def embed_passages(self, texts: list[str]) -> list[list[list[float]]]:
        split = [_SENTENCE.split(" ".join(text.split())) for text in texts]
        self.prime([s for sentences in split for s in sentences])
        vectors = []
        for sentences in split:
            mean = np.mean([self._cache[s] for s in sentences], axis=0)
            vectors.append([(mean / np.linalg.norm(mean)).tolist()])
        return vectors


if __name__ == "__main__":
    raise SystemExit(main())
