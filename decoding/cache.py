"""KV caches with explicit slots: a full cache, and a StreamingLLM window (sinks + recent tokens).

Keys are stored after RoPE, at their true positions, so a cache can be cropped to an accepted
prefix or compacted to a window without recomputing anything.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class KVCache:
    """Preallocated per-layer K/V of shape [n_kv_heads, capacity, head_dim]; `length` slots valid."""

    def __init__(
        self, n_layers: int, n_kv_heads: int, head_dim: int, capacity: int, dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> None:
        shape = (n_kv_heads, capacity, head_dim)
        # Uninitialised: only the `length` valid slots are ever read, and zero-filling a long
        # context's cache would cost as much as copying a cached prefix into it.
        self.keys = [torch.empty(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.values = [torch.empty(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.length = 0
        self.next_position = 0  # RoPE position of the next token written

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[1]

    def reserve(self, extra: int) -> None:
        """Make room for `extra` more slots (grows geometrically; decode never reallocates)."""
        needed = self.length + extra
        if needed <= self.capacity:
            return
        new_capacity = max(needed, int(self.capacity * 1.5) + 64)
        for store in (self.keys, self.values):
            for i, old in enumerate(store):
                grown = old.new_empty((old.shape[0], new_capacity, old.shape[2]))
                grown[:, : self.length] = old[:, : self.length]
                store[i] = grown

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store new K/V ([n_kv, T, D]) after the valid slots; return the valid K/V including them."""
        end = self.length + k.shape[1]
        self.keys[layer][:, self.length : end] = k
        self.values[layer][:, self.length : end] = v
        return self.keys[layer][:, :end], self.values[layer][:, :end]

    def advance(self, n_tokens: int) -> None:
        self.length += n_tokens
        self.next_position += n_tokens

    def crop(self, n_positions: int) -> None:
        """Forget every token at position >= n_positions (rejected drafts)."""
        drop = self.next_position - n_positions
        if drop < 0:
            raise ValueError(f"cannot crop forward: cache at {self.next_position}, asked {n_positions}")
        self.length -= drop
        self.next_position = n_positions

    def slots(self, start: int, end: int) -> dict[str, torch.Tensor]:
        """Slots [start, end) of every layer as "k{layer}" / "v{layer}", copied (safe to keep while the
        cache moves on)."""
        tensors = {}
        for layer, (keys, values) in enumerate(zip(self.keys, self.values, strict=True)):
            tensors[f"k{layer}"] = keys[:, start:end].clone()
            tensors[f"v{layer}"] = values[:, start:end].clone()
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
        n_kv, _, head_dim = full.keys[0].shape
        kept = sum(end - start for start, end in spans)
        cache = cls(len(full.keys), n_kv, head_dim, kept + spare, full.keys[0].dtype, full.keys[0].device)
        index = torch.cat([torch.arange(start, end) for start, end in spans]).to(full.keys[0].device)
        for layer in range(len(full.keys)):
            cache.keys[layer][:, :kept] = full.keys[layer].index_select(1, index)
            cache.values[layer][:, :kept] = full.values[layer].index_select(1, index)
        cache.length = kept
        cache.next_position = next_position
        return cache

    def clone(self) -> KVCache:
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
        n_kv, _, head_dim = full.keys[0].shape
        cache = cls(
            sinks=sinks, window=window, n_layers=len(full.keys), n_kv_heads=n_kv, head_dim=head_dim,
            capacity=sinks + window + spare, dtype=full.keys[0].dtype, device=full.keys[0].device,
        )
        keep_recent = min(window, max(0, full.length - sinks))
        head = min(sinks, full.length)
        for layer in range(len(full.keys)):
            for src, dst in ((full.keys, cache.keys), (full.values, cache.values)):
                dst[layer][:, :head] = src[layer][:, :head]
                dst[layer][:, head : head + keep_recent] = src[layer][:, full.length - keep_recent : full.length]
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
