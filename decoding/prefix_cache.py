"""Prefill once: the target's KV cache for a document prefix, kept on disk and in memory.

Keyed by the model's identity, its dtype and the exact prefix tokens (which already encode the
corpus content, the document order and the prompt template), so any change to documents,
template or model is a different key: nothing stale can be served. Files are evicted least
recently used first when the directory grows past its size limit.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import OrderedDict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from decoding.cache import KVCache
from decoding.generate import PrefixCacheHooks
from decoding.model import Transformer


class PrefixCache:
    def __init__(self, directory: Path, model_ids: dict[int, str], max_bytes: int = 8 << 30,
                 in_memory: int = 2) -> None:
        """model_ids maps id(Transformer) -> a stable identity (e.g. its weights' directory and source hash).

        The last `in_memory` prefixes stay in RAM (two: the target's and the SD drafter's).
        """
        self.directory = directory
        self.model_ids = model_ids
        self.max_bytes = max_bytes
        self.in_memory = in_memory
        self._hot: OrderedDict[str, KVCache] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def key(self, model: Transformer, prefix: list[int]) -> str:
        digest = hashlib.sha256()
        digest.update(self.model_ids.get(id(model), repr(model.args)).encode())
        digest.update(str(model.dtype).encode())
        digest.update(torch.tensor(prefix, dtype=torch.int64).numpy().tobytes())
        return digest.hexdigest()[:32]

    def hooks(self) -> PrefixCacheHooks:
        return PrefixCacheHooks(load=self.load, save=self.save)

    def load(self, model: Transformer, prefix: list[int], capacity: int) -> KVCache | None:
        key = self.key(model, prefix)
        if key in self._hot:
            cache = self._hot[key]
            self._hot.move_to_end(key)
            cache.crop(len(prefix))  # drop the previous question's tokens; the prefix is untouched
            cache.reserve(capacity - len(prefix))
            self.hits += 1
            return cache
        path = self.directory / f"{key}.safetensors"
        if not path.exists():
            self.misses += 1
            return None
        tensors = load_file(str(path), device=str(model.device))
        cache = model.new_cache(max(capacity, len(prefix)))
        for layer in range(model.args.n_layers):
            cache.keys[layer][:, : len(prefix)] = tensors[f"k{layer}"]
            cache.values[layer][:, : len(prefix)] = tensors[f"v{layer}"]
        cache.length = cache.next_position = len(prefix)
        os.utime(path)  # recency for eviction
        self._remember(key, cache)
        self.hits += 1
        return cache

    def save(self, model: Transformer, prefix: list[int], cache: KVCache) -> None:
        key = self.key(model, prefix)
        n = len(prefix)
        tensors = {}
        for layer in range(model.args.n_layers):
            tensors[f"k{layer}"] = cache.keys[layer][:, :n].contiguous()
            tensors[f"v{layer}"] = cache.values[layer][:, :n].contiguous()
        self.directory.mkdir(parents=True, exist_ok=True)
        partial = self.directory / f"{key}.partial"
        save_file(tensors, str(partial), metadata={"tokens": str(n), "created": str(time.time())})
        partial.replace(self.directory / f"{key}.safetensors")  # atomic: a crash leaves no half file
        (self.directory / f"{key}.json").write_text(json.dumps({"tokens": n, "dtype": str(model.dtype)}))
        self._remember(key, cache)
        self._evict()

    def _remember(self, key: str, cache: KVCache) -> None:
        self._hot[key] = cache
        self._hot.move_to_end(key)
        while len(self._hot) > self.in_memory:
            self._hot.popitem(last=False)

    def bytes_per_1k_tokens(self, model: Transformer) -> int:
        a = model.args
        return 2 * a.n_layers * a.n_kv_heads * a.head_dim * 1000 * model.dtype.itemsize

    def _evict(self) -> None:
        files = sorted(self.directory.glob("*.safetensors"), key=lambda p: p.stat().st_mtime)
        total = sum(p.stat().st_size for p in files)
        while files and total > self.max_bytes:
            oldest = files.pop(0)
            total -= oldest.stat().st_size
            oldest.unlink(missing_ok=True)
            oldest.with_suffix(".json").unlink(missing_ok=True)
