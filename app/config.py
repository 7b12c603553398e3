"""The one typed configuration object. Every entry point (CLI, UI, bench, eval) builds a Settings."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from app.answer_style import BRIEF, check_style
from decoding.settings import DecodingSettings
from retrieval.types import RetrievalSettings


def default_home() -> Path:
    """Where models, indexes and caches live; RAPIDQA_HOME overrides it."""
    return Path(os.environ.get("RAPIDQA_HOME", Path.home() / ".cache" / "rapidqa")).expanduser()


def default_models_dir() -> Path:
    """Converted models; RAPIDQA_MODELS_DIR lets several homes (tests, CI) share one copy."""
    override = os.environ.get("RAPIDQA_MODELS_DIR")
    return Path(override).expanduser() if override else default_home() / "models"


RAG_READ_CHUNK_KV = "chunk-kv"
RAG_READ_JOINT = "joint"
RAG_READS = (RAG_READ_CHUNK_KV, RAG_READ_JOINT)


@dataclass(frozen=True)
class ModelSettings:
    target: str = "qwen2.5-coder-1.5b"  # registry name, HF model directory, or .gguf path
    drafter: str = "qwen2.5-coder-0.5b"
    # auto = on a CPU the GGUF's own quantized weights where the model has them (activations bf16 where the
    # CPU has bf16, else fp32); bf16 on CUDA. An explicit dtype (bf16, fp32) keeps dense weights.
    dtype: str = "auto"
    device: str = "auto"  # auto = cuda when present, else cpu


@dataclass(frozen=True)
class Limits:
    max_question_chars: int = 2000
    max_new_tokens: int = 1024
    # A conversation's earlier exchanges in the prompts, in target tokens: beyond it the oldest are
    # left out (and the answer says so); each kept token is read again at every turn.
    max_history_tokens: int = 1536
    max_upload_bytes: int = 50 * 1024 * 1024
    max_files_per_upload: int = 20


@dataclass(frozen=True)
class ServerSettings:
    host: str = "127.0.0.1"  # listening wider needs an explicit --host
    port: int = 7860
    auth: tuple[str, str] | None = None  # (user, password)
    api: bool = True  # the OpenAI-compatible /v1 routes (app.api) on the same process
    api_key: str | None = None  # Bearer token the /v1 routes require; needed beyond loopback


@dataclass(frozen=True)
class Settings:
    home: Path = field(default_factory=default_home)
    models_dir: Path = field(default_factory=default_models_dir)
    models: ModelSettings = field(default_factory=ModelSettings)
    retrieval: RetrievalSettings = field(default_factory=RetrievalSettings)
    decoding: DecodingSettings = field(default_factory=DecodingSettings)
    limits: Limits = field(default_factory=Limits)
    server: ServerSettings = field(default_factory=ServerSettings)
    # RAPID's drafter reads its passages from KV built per chunk at ingest instead of prefilling them.
    drafter_chunk_kv: bool = True
    # How the `rag` method's target reads its retrieved passages: RAG_READ_CHUNK_KV assembles the
    # target's per-chunk KV (each passage read after the prompt's header, no attention between
    # passages) and prefills only the question; RAG_READ_JOINT prefills the passages together per
    # question (the exact read, slower).
    rag_read: str = RAG_READ_CHUNK_KV
    # RAM for the target's KV of a corpus larger than its window (the server and eval): when every
    # window's KV fits, all stay loaded, so a question routed to another window reads no disk.
    hot_windows_gb: float = 6.0
    # Disk for each drafter's per-chunk KV of an index; past it the least recently read chunks go
    # (and are encoded again when a question retrieves them).
    chunk_kv_gb: float = 8.0
    # Questions decoded at once, their passes batched by the scheduler; more wait for a place. The
    # web server's concurrency limit follows it.
    max_sessions: int = 8
    # At batch > 1 the scheduler picks each draft's length from the measured cost of passes (0: a
    # plain step); False keeps the configured gamma (benchmarks compare the two).
    plan_drafts: bool = True
    # The target's cached document KV; None: <home>/kv. Processes serving one corpus may share one.
    kv_dir: Path | None = None
    # What every model's KV cache stores (decoding.loading.pick_kv_dtype): auto = the 8-bit form on a
    # CPU, the model's dtype elsewhere; "q8" / "bf16" explicit (bf16: the unquantized cache, in the
    # model's dtype). Cached prefixes and chunk KV are kept per form.
    kv_dtype: str = "auto"
    # How answers are asked to be shaped (app.answer_style): "brief", or "lead" (the answer's first
    # sentence, then one of support).
    answer_style: str = BRIEF

    def __post_init__(self) -> None:
        check_style(self.answer_style)
        if self.rag_read not in RAG_READS:
            raise ValueError(f"rag_read {self.rag_read!r}: choose one of {', '.join(RAG_READS)}")

    @property
    def default_index_dir(self) -> Path:
        return self.home / "index"

    @property
    def kv_cache_dir(self) -> Path:
        return self.kv_dir if self.kv_dir is not None else self.home / "kv"

    @property
    def uploads_dir(self) -> Path:
        return self.home / "uploads"
