"""A prompt prefix put together from KV encoded piece by piece (the RAPID drafter's passages).

A piece is encoded once, alone, starting at position 0; keys are stored after RoPE, so placing
the piece at position p rotates every key by p more (RoPE rotations compose), in fp32. Values
carry no position. What a piece lacks is attention to what precedes it in the prompt: that is
the drafter's approximation, which can cost acceptance but never exactness, since the target
verifies every token.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from decoding.cache import KVCache
from decoding.model import Transformer, rotate_half

PieceKV = dict[str, torch.Tensor]  # "k{layer}" / "v{layer}" -> [n_kv_heads, tokens, head_dim]


def piece_length(piece: PieceKV) -> int:
    return piece["k0"].shape[1]


@torch.inference_mode()
def encode_piece(model: Transformer, tokens: Sequence[int]) -> PieceKV:
    """The piece's KV with the piece alone at position 0."""
    cache = model.new_cache(len(tokens) + 1)
    model.prefill(torch.tensor(list(tokens), device=model.device), cache)
    return cache.slots(0, len(tokens))


@torch.inference_mode()
def assemble(model: Transformer, pieces: Sequence[PieceKV], capacity: int) -> KVCache:
    """A cache of at least `capacity` slots holding the pieces one after another from position 0."""
    total = sum(piece_length(p) for p in pieces)
    cache = model.new_cache(max(capacity, total))
    position = 0
    for piece in pieces:
        end = position + piece_length(piece)
        cos, sin = _rotation(model, position)
        for layer in range(model.args.n_layers):
            keys = piece[f"k{layer}"]
            if position:
                keys = (keys.float() * cos + rotate_half(keys.float()) * sin).to(keys.dtype)
            cache.keys[layer][:, position:end] = keys
            cache.values[layer][:, position:end] = piece[f"v{layer}"]
        position = end
    cache.length = cache.next_position = total
    return cache


def _rotation(model: Transformer, delta: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of RoPE's angles for a shift of `delta` positions ([head_dim], fp32; angles in fp64)."""
    angles = delta * model.inv_freq.to(torch.float64)
    angles = torch.cat((angles, angles))
    return angles.cos().float(), angles.sin().float()
