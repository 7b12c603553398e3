"""Prefill once: the target's KV cache for a document prefix, kept on disk and in memory.

Keyed by what the KV values depend on: the engine's code (its sources, the attention kernel's,
torch's version), the model (its stable id when the caller has one, and always a fingerprint of
what it computes), its dtype, the form its KV is stored in (the model's dtype or 8-bit,
decoding/kv_quant.py) and the exact prefix tokens (which already encode the corpus
content, the document order and the prompt template). Anything that would change the values is
a different key: nothing stale can be served.

A load hands out a cache on the stored prefix's K/V as a read-only shared base (decoding/cache.py):
sessions reading the same documents share one copy in memory, and each writes only its own slots,
so no caller can crop or overwrite another's. Files are evicted least recently used first when the
directory grows past its size limit; an entry dropped from memory lives on in the caches that use it.
Several sessions' threads call in at once: the in-memory entries are guarded by a lock.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import platform
import tempfile
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from decoding.attention import native_attention
from decoding.cache import KVCache, bytes_per_token
from decoding.prefill import PrefillProgress, PrefixCacheHooks, prefill_parts
from decoding.transformer import Run, Transformer

ENGINE_DIR = Path(__file__).resolve().parent
PROBE_TOKENS = 16
STALE_PARTIAL_S = 3600.0  # a temp file this old belongs to a writer that died


# The engine sources that decide a stored KV value: the forward pass and its kernels, weight
# loading and conversion (GGUF unpacking included), the cache layout, prefill (prefill.prefill_parts
# cuts the prompt into parts), the assembly of chunk KV and this file's format. Drafting, acceptance, sampling and
# statistics only run after a prefix is read, so editing them keeps every cache valid.
KV_SOURCES = ("attention.py", "cache.py", "gguf.py", "kv_quant.py", "native.py", "loaded_model.py", "loading.py",
              "prefill.py", "prefix_cache.py", "quant.py", "rowwise.py", "segments.py", "transformer.py", "kernels/*")


def chained_keys(seed: bytes, prefix: list[int], cuts: Sequence[int]) -> list[str]:
    """A hash of seed + prefix[:cut] for each cut, in one pass over the tokens."""
    digest = hashlib.sha256(seed)
    keys, start = [], 0
    for cut in cuts:
        digest.update(torch.tensor(prefix[start:cut], dtype=torch.int64).numpy().tobytes())
        keys.append(digest.copy().hexdigest()[:32])
        start = cut
    return keys


@functools.cache
def engine_stamp() -> str:
    """Hash of everything besides the weights that decides KV values: the KV-deciding engine and
    kernel sources, torch's version, the CPU and whether the native attention kernel runs."""
    digest = hashlib.sha256()
    for path in sorted(p for pattern in KV_SOURCES for p in ENGINE_DIR.glob(pattern)):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    digest.update(f"{torch.__version__}|{platform.machine()}|{native_attention() is not None}".encode())
    return digest.hexdigest()


def model_fingerprint(model: Transformer) -> str:
    """What the model computes, hashed: its logits for a fixed probe sequence (with its config).

    Two objects with the same weights agree; different weights, a quantised variant or another
    kernel path of the same directory disagree, with no file name or id to trust.
    """
    probe = torch.arange(PROBE_TOKENS, device=model.device) * 7919 % model.args.vocab_size
    logits = model.forward(probe, model.new_cache(PROBE_TOKENS), all_logits=True)
    digest = hashlib.sha256(repr(model.args).encode() + str(model.dtype).encode())
    digest.update(logits.float().cpu().numpy().tobytes())
    return digest.hexdigest()


class KVStore:
    """Named per-layer K/V tensors of a token sequence, on disk (atomic writes, LRU eviction by size)."""

    def __init__(self, directory: Path, max_bytes: int | None = None) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        # Bytes on disk as last counted plus this process's writes since: a store of thousands of
        # chunk files is counted again only when it may be over its bound, not at every write.
        self._bytes: int | None = None

    def path(self, name: str) -> Path:
        return self.directory / f"{name}.safetensors"

    def read(self, name: str, device: torch.device) -> dict[str, torch.Tensor] | None:
        path = self.path(name)
        try:
            tensors = load_file(str(path), device=str(device))
            os.utime(path)  # recency for eviction
        except FileNotFoundError:
            return None
        return tensors

    def metadata(self, name: str) -> dict[str, str]:
        try:
            with safe_open(str(self.path(name)), framework="pt") as handle:
                return handle.metadata() or {}
        except (FileNotFoundError, OSError):
            return {}

    def write(self, name: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        # A temp name of its own per writer: two processes saving the same key never write into
        # one file, and the rename is atomic, so a reader sees a whole file or none.
        handle, partial = tempfile.mkstemp(prefix=f"{name}.", suffix=".partial", dir=self.directory)
        os.close(handle)
        try:
            save_file(tensors, partial, metadata=metadata)
            added = Path(partial).stat().st_size
            os.replace(partial, self.path(name))
        except BaseException:
            Path(partial).unlink(missing_ok=True)
            raise
        self._evict(added)

    def delete(self, name: str) -> None:
        self.path(name).unlink(missing_ok=True)

    def names(self) -> list[str]:
        return [p.name.removesuffix(".safetensors") for p in self.directory.glob("*.safetensors")]

    def _evict(self, added: int) -> None:
        if self.max_bytes is not None and self._bytes is not None and self._bytes + added <= self.max_bytes:
            self._bytes += added
            return
        now = time.time()
        for partial in self.directory.glob("*.partial"):
            with contextlib.suppress(FileNotFoundError):  # another process may remove it first
                if now - partial.stat().st_mtime > STALE_PARTIAL_S:
                    partial.unlink()
        if self.max_bytes is None:
            return
        files = []
        for path in self.directory.glob("*.safetensors"):
            with contextlib.suppress(FileNotFoundError):
                stat = path.stat()
                files.append((stat.st_mtime, stat.st_size, path))
        files.sort()
        total = sum(size for _, size, _ in files)
        while files and total > self.max_bytes:
            _, size, oldest = files.pop(0)
            total -= size
            oldest.unlink(missing_ok=True)
        self._bytes = total


@dataclass(frozen=True)
class _Entry:
    tensors: dict[str, torch.Tensor]
    cut_keys: list[str]  # key of the prefix up to each document end, the whole prefix last


class PrefixCache:
    def __init__(self, directory: Path, model_ids: dict[int, str] | None = None, max_bytes: int = 8 << 30,
                 in_memory: int = 2) -> None:
        """model_ids maps id(Transformer) -> a stable identity (e.g. its weights' directory and stamp).

        The last `in_memory` prefixes stay in RAM (two: the target's and the SD drafter's).
        """
        self.store = KVStore(directory, max_bytes)
        self.model_ids = model_ids if model_ids is not None else {}
        self.in_memory = in_memory
        self._hot: OrderedDict[str, _Entry] = OrderedDict()
        self._lock = threading.RLock()  # _hot, as sessions' threads load and save at once
        self._fingerprints: weakref.WeakKeyDictionary[Transformer, str] = weakref.WeakKeyDictionary()

    @property
    def directory(self) -> Path:
        return self.store.directory

    def model_key(self, model: Transformer) -> str:
        """The model's part of every key: engine stamp, given identity, fingerprint, dtype and KV form
        (a prefix stored in one form is never served to a model whose caches hold the other)."""
        if model not in self._fingerprints:
            self._fingerprints[model] = model_fingerprint(model)
        parts = (engine_stamp(), self.model_ids.get(id(model), ""), self._fingerprints[model], str(model.dtype),
                 f"kv {model.kv_dtype}")
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()

    def key(self, model: Transformer, prefix: list[int]) -> str:
        return self.cut_keys(model, prefix, [len(prefix)])[-1]

    def cut_keys(self, model: Transformer, prefix: list[int], cuts: Sequence[int]) -> list[str]:
        """key(model, prefix[:cut]) for each cut, hashed in one pass."""
        return chained_keys(self.model_key(model).encode(), prefix, cuts)

    @staticmethod
    def content_keys(prefix: list[int], cuts: Sequence[int]) -> list[str]:
        """A hash of prefix[:cut] for each cut, the same for every model: which tokens an entry holds,
        so that forget() finds every model's entries that hold a given run of tokens."""
        return chained_keys(b"tokens", prefix, cuts)

    def forget(self, prefix: list[int], cut: int) -> int:
        """Delete every stored prefix (of any model) that starts with prefix[:cut], from disk and
        memory (a deleted document's KV); returns how many went."""
        wanted = self.content_keys(prefix, [cut])[0]
        gone = [name for name in self.store.names()
                if wanted in json.loads(self.store.metadata(name).get("content", "[]"))]
        for name in gone:
            self.store.delete(name)
            with self._lock:
                self._hot.pop(name, None)
        return len(gone)

    def hooks(self, cuts: Sequence[int] = (), progress: PrefillProgress | None = None,
              run: Run | None = None) -> PrefixCacheHooks:
        """Loader and saver for generate(). With `cuts` (where the prefix's documents end, see
        Prompt.cuts), a prefix that is not stored is still served when a stored one shares its
        first documents: those are restored and the rest prefilled (reporting progress), document
        by document as generate prefills a prefix from scratch, so both give the same bits."""
        if not cuts:
            return PrefixCacheHooks(load=self.load, save=self.save)
        restored = [0]  # of the last prefix load returned, the tokens read from storage

        def load(model: Transformer, prefix: list[int], capacity: int) -> KVCache | None:
            cache = self.load(model, prefix, capacity)
            if cache is not None:
                restored[0] = len(prefix)
                return cache
            cache = self.longest(model, prefix, cuts, capacity)
            if cache is None:
                return None
            restored[0] = cache.length
            return self._extend(model, prefix, cuts, cache, progress, run)

        def save(model: Transformer, prefix: list[int], cache: KVCache) -> None:
            self.save(model, prefix, cache, cuts)

        return PrefixCacheHooks(load=load, save=save, restored_tokens=lambda: restored[0])

    def contains(self, model: Transformer, prefix: list[int]) -> bool:
        key = self.key(model, prefix)
        with self._lock:
            held = key in self._hot
        return held or self.store.path(key).exists()

    def load(self, model: Transformer, prefix: list[int], capacity: int) -> KVCache | None:
        """A new cache of at least `capacity` slots holding the prefix, or None when it is not stored."""
        key = self.key(model, prefix)
        entry = self._entry(key, model.device)
        return None if entry is None else self._materialize(model, entry, len(prefix), capacity)

    def hold(self, model: Transformer, prefix: list[int]) -> bool:
        """Read a stored prefix into memory as the most recent one, without copying it into a cache;
        False when it is not stored."""
        return self._entry(self.key(model, prefix), model.device) is not None

    def longest(self, model: Transformer, prefix: list[int], cuts: Sequence[int], capacity: int) -> KVCache | None:
        """A new cache holding the longest prefix[:cut] that a stored prefix starts with, or None."""
        wanted = dict(zip(self.cut_keys(model, prefix, cuts), cuts, strict=True))
        best: tuple[int, str] | None = None
        for key, entry_cuts in self._known_cuts():
            for cut_key in entry_cuts:
                n = wanted.get(cut_key)
                if n is not None and (best is None or n > best[0]):
                    best = (n, key)
        if best is None:
            return None
        entry = self._entry(best[1], model.device)
        return None if entry is None else self._materialize(model, entry, best[0], capacity)

    def extend(self, model: Transformer, prefix: list[int], cuts: Sequence[int], capacity: int,
               progress: PrefillProgress | None = None, run: Run | None = None) -> KVCache | None:
        """The longest stored document prefix, then the remaining documents prefilled; None when no
        stored prefix shares even the header."""
        cache = self.longest(model, prefix, cuts, capacity)
        return None if cache is None else self._extend(model, prefix, cuts, cache, progress, run)

    def _extend(self, model: Transformer, prefix: list[int], cuts: Sequence[int], cache: KVCache,
                progress: PrefillProgress | None, run: Run | None) -> KVCache:
        prefill_parts(model, prefix, cuts, cache, progress, run)
        self.save(model, prefix, cache, cuts)
        return cache

    def save(self, model: Transformer, prefix: list[int], cache: KVCache, cuts: Sequence[int] = ()) -> None:
        cuts = [c for c in cuts if 0 < c < len(prefix)] + [len(prefix)]
        keys = self.cut_keys(model, prefix, cuts)
        tensors = cache.slots(0, len(prefix))
        content = self.content_keys(prefix, cuts)
        self.store.write(keys[-1], tensors, metadata={"cuts": json.dumps(keys), "content": json.dumps(content)})
        self._remember(keys[-1], _Entry(tensors, keys))

    def _entry(self, key: str, device: torch.device) -> _Entry | None:
        with self._lock:
            entry = self._hot.get(key)
        if entry is None:
            tensors = self.store.read(key, device)
            if tensors is None:
                return None
            entry = _Entry(tensors, json.loads(self.store.metadata(key).get("cuts", "[]")))
        self._remember(key, entry)
        return entry

    def _known_cuts(self) -> list[tuple[str, list[str]]]:
        """(key, its cut keys) of every stored prefix, in memory first."""
        with self._lock:
            hot = list(reversed(self._hot.items()))
        known = [(key, entry.cut_keys) for key, entry in hot]
        held = {key for key, _ in hot}
        for name in self.store.names():
            if name not in held:
                known.append((name, json.loads(self.store.metadata(name).get("cuts", "[]"))))
        return known

    @staticmethod
    def _materialize(model: Transformer, entry: _Entry, n: int, capacity: int) -> KVCache:
        """A cache on the entry's first n slots as its shared base (never copied, never written)."""
        layers = range(model.args.n_layers)
        stored = entry.tensors["k0"].dtype
        if stored != model.kv_dtype:  # the key holds the KV form: only a damaged file gets here
            raise ValueError(f"a stored prefix holds {stored} K/V, the model's caches hold {model.kv_dtype}")
        return KVCache.on_base([entry.tensors[f"k{layer}"] for layer in layers],
                               [entry.tensors[f"v{layer}"] for layer in layers], n, capacity, model.args.head_dim)

    def _remember(self, key: str, entry: _Entry) -> None:
        with self._lock:
            self._hot[key] = entry
            self._hot.move_to_end(key)
            while len(self._hot) > self.in_memory:
                self._hot.popitem(last=False)

    def bytes_per_1k_tokens(self, model: Transformer) -> int:
        """What 1,000 tokens of the model's prefix take, in memory and stored (in its KV form)."""
        a = model.args
        return 1000 * bytes_per_token(a.n_layers, a.n_kv_heads, a.head_dim, model.kv_dtype)
