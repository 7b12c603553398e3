"""KV caches with explicit slots: a full cache, and a StreamingLLM window (sinks + recent tokens).

Keys are stored after RoPE, at their true positions, so a cache can be cropped to an accepted
prefix or compacted to a window without recomputing anything.

A cache may start on a shared base: the read-only K/V of a document prefix that several sessions
read at once (decoding/prefix_cache.py hands one out per stored prefix). Its first KV_BLOCK-aligned
slots are read from the base in place; the cache's own storage holds the rest, so sessions share
one copy of the documents and each owns only its question and answer slots. The alignment lets the
attention kernel read each shared block once for every session, with the blocks it uses alone.

A cache stores K/V in the model's dtype or in the 8-bit form (decoding/kv_quant.py: per token and
K/V head one byte row of int8 values and their scales). Every slot operation below (crop, span,
gather, clone, a shared base) works on the slot axis alone, so it is the same for both forms; only
`write` converts, quantizing new K/V when the cache is 8-bit. The storage's last dim is then the
row's bytes, not head_dim, which is why a cache carries head_dim itself.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from decoding import kv_quant

KV_BLOCK = 512  # keys per attention work item (kernels/attention.c BLOCK); shared bases end on it
# (K, V) pairs of [n_kv_heads, slots, head_dim] (8-bit: row bytes), in slot order: a layer's valid keys
Segments = tuple[tuple[torch.Tensor, torch.Tensor], ...]


def storage_dim(head_dim: int, dtype: torch.dtype) -> int:
    """The last dim of a cache's K/V tensors: head_dim, or an 8-bit row's bytes."""
    return kv_quant.row_bytes(head_dim) if dtype == kv_quant.STORAGE else head_dim


def bytes_per_token(n_layers: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """Bytes one token's K and V take in a cache of `dtype` (in memory and stored alike)."""
    return 2 * n_layers * n_kv_heads * storage_dim(head_dim, dtype) * dtype.itemsize


class KVCache:
    """Preallocated per-layer K/V of shape [n_kv_heads, capacity, storage_dim]; `length` slots valid.

    dtype torch.uint8 (kv_quant.STORAGE) is the 8-bit form, any float dtype plain K/V.
    With a base, slots [0, offset) are the base's (never written) and own slot i is slot offset + i.
    """

    def __init__(
        self, n_layers: int, n_kv_heads: int, head_dim: int, capacity: int, dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> None:
        self.head_dim = head_dim
        shape = (n_kv_heads, capacity, storage_dim(head_dim, dtype))
        # Uninitialised: only the `length` valid slots are ever read, and zero-filling a long
        # context's cache would cost as much as copying a cached prefix into it.
        self.keys = [torch.empty(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.values = [torch.empty(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.base_keys: list[torch.Tensor] = []  # per layer, the shared base's slots [0, offset)
        self.base_values: list[torch.Tensor] = []
        self.offset = 0
        self.length = 0
        self.next_position = 0  # RoPE position of the next token written

    @classmethod
    def on_base(cls, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor], n: int, capacity: int,
                head_dim: int) -> KVCache:
        """A cache holding the first n slots of the read-only per-layer K/V `keys`/`values` ([n_kv,
        >= n, storage_dim] each, of either form), with room for `capacity` slots in all. The base is
        read in place up to the last KV_BLOCK boundary; the few slots after it are copied into the
        cache's own storage."""
        offset = n - n % KV_BLOCK
        n_kv, _, stored = keys[0].shape
        if stored != storage_dim(head_dim, keys[0].dtype):
            raise ValueError(f"stored K/V rows of {stored} {keys[0].dtype} do not hold head_dim {head_dim}")
        cache = cls(len(keys), n_kv, head_dim, max(capacity, n) - offset, keys[0].dtype, keys[0].device)
        cache.base_keys = [k[:, :offset] for k in keys]
        cache.base_values = [v[:, :offset] for v in values]
        cache.offset = offset
        for layer in range(len(keys)):
            cache.keys[layer][:, : n - offset] = keys[layer][:, offset:n]
            cache.values[layer][:, : n - offset] = values[layer][:, offset:n]
        cache.length = cache.next_position = n
        return cache

    @property
    def dtype(self) -> torch.dtype:
        """The storage's dtype: kv_quant.STORAGE for the 8-bit form."""
        return self.keys[0].dtype

    @property
    def quantized(self) -> bool:
        return kv_quant.is_quantized(self.keys[0])

    @property
    def capacity(self) -> int:
        return self.offset + self.keys[0].shape[1]

    @property
    def base(self) -> object | None:
        """What identifies the shared base (sessions on the same one can be batched over it)."""
        return (self.base_keys[0].data_ptr(), self.offset) if self.base_keys else None

    def reserve(self, extra: int) -> None:
        """Make room for `extra` more slots (grows geometrically; decode never reallocates)."""
        needed = self.length + extra
        if needed <= self.capacity:
            return
        own, used = self.keys[0].shape[1], self.length - self.offset
        new_own = max(needed - self.offset, int(own * 1.5) + 64)
        for store in (self.keys, self.values):
            for i, old in enumerate(store):
                grown = old.new_empty((old.shape[0], new_own, old.shape[2]))
                grown[:, :used] = old[:, :used]
                store[i] = grown

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> Segments:
        """Store new K/V ([n_kv, T, D]) after the valid slots; return the valid K/V including them.
        An 8-bit cache stores them quantized (per token: a verify pass writes the decode steps' bytes)."""
        start = self.length - self.offset
        end = start + k.shape[1]
        if self.quantized:
            kv_quant.write(k, v, self.keys[layer][:, start:end], self.values[layer][:, start:end])
        else:
            self.keys[layer][:, start:end] = k
            self.values[layer][:, start:end] = v
        own = (self.keys[layer][:, :end], self.values[layer][:, :end])
        if not self.offset:
            return (own,)
        return ((self.base_keys[layer], self.base_values[layer]), own)

    def advance(self, n_tokens: int) -> None:
        self.length += n_tokens
        self.next_position += n_tokens

    def crop(self, n_positions: int) -> None:
        """Forget every token at position >= n_positions (rejected drafts)."""
        drop = self.next_position - n_positions
        if drop < 0:
            raise ValueError(f"cannot crop forward: cache at {self.next_position}, asked {n_positions}")
        if self.length - drop < self.offset:
            raise ValueError("cannot crop into a cache's shared base")
        self.length -= drop
        self.next_position = n_positions

    def span(self, layer: int, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Slots [start, end) of one layer as K/V views, or copies where they straddle the base."""
        o = self.offset
        if start >= o:
            return self.keys[layer][:, start - o : end - o], self.values[layer][:, start - o : end - o]
        if end <= o:
            return self.base_keys[layer][:, start:end], self.base_values[layer][:, start:end]
        return (torch.cat([self.base_keys[layer][:, start:], self.keys[layer][:, : end - o]], dim=1),
                torch.cat([self.base_values[layer][:, start:], self.values[layer][:, : end - o]], dim=1))

    def slots(self, start: int, end: int) -> dict[str, torch.Tensor]:
        """Slots [start, end) of every layer as "k{layer}" / "v{layer}", copied (safe to keep while the
        cache moves on)."""
        tensors = {}
        for layer in range(len(self.keys)):
            keys, values = self.span(layer, start, end)
            tensors[f"k{layer}"] = keys.clone()
            tensors[f"v{layer}"] = values.clone()
        return tensors

    def after_commit(self) -> None:
        """Hook for caches that evict; a full cache keeps everything."""

    @classmethod
    def gather(cls, full: KVCache, spans: Sequence[tuple[int, int]], spare: int, next_position: int) -> KVCache:
        """A cache holding only the slots in `spans` (sorted, disjoint [start, end) ranges of a full cache,
        whose slots are its positions, all before next_position), copied, with room for `spare` more.

        Slots stay in position order and keys keep the rotation of their true positions, so the same
        causal mask applies; the slot -> position map is simply no longer the identity.
        """
        if spans and spans[-1][1] > next_position:
            raise ValueError("a gathered slot lies at or after the next position")
        kept = sum(end - start for start, end in spans)
        cache = cls(len(full.keys), full.keys[0].shape[0], full.head_dim, kept + spare, full.dtype, full.keys[0].device)
        for layer in range(len(full.keys)):
            at = 0
            for start, end in spans:
                keys, values = full.span(layer, start, end)
                cache.keys[layer][:, at : at + end - start] = keys
                cache.values[layer][:, at : at + end - start] = values
                at += end - start
        cache.length = kept
        cache.next_position = next_position
        return cache

    def clone(self) -> KVCache:
        """A copy of the cache's own slots; a shared base stays shared (it is never written)."""
        copy = object.__new__(type(self))
        copy.__dict__.update(self.__dict__)
        copy.keys = [k.clone() for k in self.keys]
        copy.values = [v.clone() for v in self.values]
        return copy


class StreamingCache(KVCache):
    """StreamingLLM: the first `sinks` tokens plus the most recent `window` tokens (MagicDec's drafter).

    Slots stay in position order, so the same bottom-right causal mask applies; only the mapping
    slot -> position is no longer the identity, which is why positions are tracked separately.
    """

    def __init__(self, sinks: int, window: int, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.sinks = sinks
        self.window = window

    @classmethod
    def from_prefix(cls, full: KVCache, sinks: int, window: int, spare: int) -> StreamingCache:
        """Derive the window from a full cache (the target's prefilled prompt), no recomputation."""
        cache = cls(
            sinks=sinks, window=window, n_layers=len(full.keys), n_kv_heads=full.keys[0].shape[0],
            head_dim=full.head_dim, capacity=sinks + window + spare, dtype=full.dtype, device=full.keys[0].device,
        )
        keep_recent = min(window, max(0, full.length - sinks))
        head = min(sinks, full.length)
        for layer in range(len(full.keys)):
            for part, (begin, end) in enumerate(((0, head), (full.length - keep_recent, full.length))):
                at = 0 if part == 0 else head
                keys, values = full.span(layer, begin, end)
                cache.keys[layer][:, at : at + end - begin] = keys
                cache.values[layer][:, at : at + end - begin] = values
        cache.length = head + keep_recent
        cache.next_position = full.next_position
        return cache

    def crop(self, n_positions: int) -> None:
        # Only recent slots are ever cropped (drafts of the current step), and those are
        # contiguous at the end, so slots and positions move together there.
        drop = self.next_position - n_positions
        if drop > self.length - self.sinks:
            raise ValueError("cannot crop into the evicted part of a streaming cache")
        super().crop(n_positions)

    def after_commit(self) -> None:
        excess = self.length - (self.sinks + self.window)
        if excess <= 0:
            return
        start, end = self.sinks + excess, self.length
        for store in (self.keys, self.values):
            for tensor in store:
                tensor[:, self.sinks : self.sinks + self.window] = tensor[:, start:end].clone()
        self.length = self.sinks + self.window
