"""The models and the embedder: loaded once, shared by every question, every pass run by one scheduler."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

from app.config import Settings
from app.registry import resolve_model
from decoding.engine_info import engine_description, warn_once
from decoding.loaded_model import LoadedModel
from decoding.loading import load_model, pick_device, pick_dtype, pick_kv_dtype, wants_quantized
from decoding.methods import method_info
from decoding.scheduler import Scheduler
from retrieval.embedding import Embedder


class Models:
    """The model pool. Every model pass of every question, ingest and upload goes through
    `scheduler` (decoding/scheduler.py), which batches them; nothing else runs a model."""

    def __init__(self, settings: Settings, log: Callable[[str], None] = print) -> None:
        self.settings = settings
        self.log = log
        self.device = pick_device(settings.models.device)
        self.scheduler = Scheduler(settings.max_sessions)
        self._models: dict[str, LoadedModel] = {}
        self._model_ids: dict[int, str] = {}  # id(Transformer) -> its weights' identity (prefix cache keys)
        self._embedder: Embedder | None = None
        self._load_lock = threading.RLock()  # re-entrant: open_index loads the embedder under it
        # One lock per model being loaded, not _load_lock: two models load at once (app/warm_up.py
        # loads the drafter while the target is loaded and the index opened).
        self._spec_locks: dict[str, threading.Lock] = {}

    def model(self, spec: str) -> LoadedModel:
        with self._load_lock:
            if spec in self._models:
                return self._models[spec]
            spec_lock = self._spec_locks.setdefault(spec, threading.Lock())
        with spec_lock:
            with self._load_lock:
                if spec in self._models:  # another thread loaded it while this one waited
                    return self._models[spec]
            quantized = wants_quantized(self.settings.models.dtype, self.device)
            # bf16 weights are converted the first time an engine that reads them asks (app/registry.py)
            directory = resolve_model(spec, self.settings.models_dir, self.log, dense=not quantized)
            dtype = pick_dtype(self.settings.models.dtype, self.device)
            kv_dtype = pick_kv_dtype(self.settings.kv_dtype, self.device)
            loaded = load_model(spec, directory, dtype, self.device, quantized=quantized, kv_dtype=kv_dtype)
            warn_once(engine_description(loaded))  # a slow fallback is said once, on stderr
            # Quantized and dense weights give different KV: cached prefixes must not mix.
            weights = "" if loaded.weights == "dense" else f":{loaded.weights}"
            with self._load_lock:
                self._model_ids[id(loaded.model)] = f"{directory.resolve()}:{_weights_stamp(directory)}{weights}"
                self._models[spec] = loaded
            return loaded

    @property
    def target(self) -> LoadedModel:
        return self.model(self.settings.models.target)

    @property
    def draft_model(self) -> LoadedModel:
        return self.model(self.settings.models.drafter)

    @property
    def embedder(self) -> Embedder:
        with self._load_lock:
            if self._embedder is None:
                self._embedder = Embedder()
            return self._embedder

    def drafter_spec(self, method: str) -> str:
        """The model that drafts for `method` on the retrieved passages (the target drafts for itself in rapid-self)."""
        return self.settings.models.target if method_info(method).drafter_is_target else self.settings.models.drafter


def _weights_stamp(directory: Path) -> str:
    marker = directory / "rapidqa-model.json"
    if marker.exists():
        return marker.read_text()
    files = sorted(directory.glob("*.safetensors"))
    return ";".join(f"{f.name}:{f.stat().st_size}:{int(f.stat().st_mtime)}" for f in files)
