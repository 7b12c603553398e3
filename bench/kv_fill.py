"""A cache whose first `length` slots hold real keys and values, for timing a pass at that depth.

A pass's cost does not depend on what the keys say, but it does depend on their memory being
real: never-written pages of a fresh cache all map the kernel's one zero page, so reading them
hits the CPU's caches and a pass at depth looks cheaper than it is. The model writes a short run
of slots itself (in whatever K/V form it stores) and those slots are copied along the slot axis
up to `length`.
"""

from __future__ import annotations

import torch

from app.reexports import Transformer

SEED_SLOTS = 256  # slots the model writes; the rest are copies of them


def filled_cache(model: Transformer, length: int, capacity: int, seed: int = 0):  # -> decoding KVCache
    """model.new_cache(capacity) with slots [0, length) written; its next token goes at `length`."""
    if not 0 <= length <= capacity:
        raise ValueError(f"cannot fill {length} slots of a cache of {capacity}")
    cache = model.new_cache(capacity)
    written = min(SEED_SLOTS, length)
    if not written:
        return cache
    tokens = torch.randint(model.args.vocab_size, (written,), generator=torch.Generator().manual_seed(seed))
    model.forward(tokens, cache)
    for store in (cache.keys, cache.values):
        for layer in store:
            for start in range(written, length, written):
                n = min(written, length - start)
                layer[:, start : start + n].copy_(layer[:, :n])
    cache.length = cache.next_position = length
    return cache
