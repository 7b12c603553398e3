"""Reading a prompt into a KV cache: the prefix (header, then each document) and the question.

This is what decides the KV values every method then decodes from (with the model and cache code),
so it is one of the engine stamp's sources (decoding/prefix_cache.py); the decoding loop is not.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from decoding.cache import KVCache
from decoding.loaded_model import Prompt
from decoding.transformer import Run, Transformer

# (model, prompt prefix tokens, capacity) -> a cache of at least that capacity holding exactly that
# prefix, for the caller's use alone until its next load; or None to prefill the prefix.
PrefixLoader = Callable[[Transformer, list[int], int], KVCache | None]
PrefixSaver = Callable[[Transformer, list[int], KVCache], None]
PrefillProgress = Callable[[int, int], None]  # (tokens done, tokens to do)


@dataclass(frozen=True)
class PrefixCacheHooks:
    load: PrefixLoader
    save: PrefixSaver
    # How many tokens of the last prefix `load` returned came from storage (a loader that extends a
    # stored prefix prefills the rest); None: all of them.
    restored_tokens: Callable[[], int] | None = None


def prefill(
    model: Transformer, prompt: Prompt, hooks: PrefixCacheHooks | None, capacity: int, run: Run | None = None
) -> tuple[KVCache, torch.Tensor, int]:
    """Prefix (header, then each document) then suffix (question), always as separate prefills.

    Splitting the same way with or without the prefix cache keeps both paths bit-identical. A cache
    of `capacity` slots is allocated only when the prefix is not restored. Returns the cache, the
    logits after the prompt and how many prefix tokens came from the prefix cache (0: none).
    """
    restored = hooks.load(model, prompt.prefix, capacity) if hooks and prompt.prefix else None
    cache = restored if restored is not None else model.new_cache(capacity)
    if restored is None and prompt.prefix:
        # Document by document: a prefix extended by an added document then matches one computed
        # from scratch bit for bit (a prefill split elsewhere rounds a few KV rows differently).
        prefill_parts(model, prompt.prefix, prompt.cuts(), cache, run=run)
        if hooks:
            hooks.save(model, prompt.prefix, cache)
    logits = model.prefill(torch.tensor(prompt.suffix, device=model.device), cache, run=run)
    if restored is None:
        return cache, logits, 0
    assert hooks is not None
    return cache, logits, hooks.restored_tokens() if hooks.restored_tokens else len(prompt.prefix)


def prefill_parts(model: Transformer, prefix: list[int], cuts: Sequence[int], cache: KVCache,
                  progress: PrefillProgress | None = None, run: Run | None = None) -> None:
    """Prefill prefix[cache.length:] one part (between cuts: the header, each document) at a time."""
    first = start = cache.length
    total = len(prefix) - first
    for end in sorted({c for c in [*cuts, len(prefix)] if c > first}):
        report = None
        if progress is not None:
            def report(done: int, _: int, before: int = start - first) -> None:
                progress(before + done, total)
        model.prefill(torch.tensor(prefix[start:end], device=model.device), cache, report, run)
        start = end
