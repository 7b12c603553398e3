"""A prompt prefix put together from KV encoded piece by piece (the RAPID drafter's passages).

A piece is encoded once, after a context it is read with (the prompt's header), and only its own
slots are kept, with the position they were encoded at; keys are stored after RoPE, so placing
the piece at position p rotates every key by p minus that position (RoPE rotations compose), in
fp32. Values carry no position. A model whose caches hold the 8-bit form (decoding/kv_quant.py)
stores its pieces in it; a moved piece's keys are then dequantized, rotated and quantized again,
so they differ slightly from the keys a prefill at the new position would store (new groups' scales,
a second rounding): fine for a drafter, whose tokens the target verifies. Unmoved pieces are copied
byte for byte. Reading each piece after the header, not alone, matters: a
sequence's first tokens draw a large share of every later token's attention (attention sinks),
so a piece encoded alone would make its own first tokens sinks, and the assembled prompt would
hold one per passage where a prompt read in one go holds one. What a piece still lacks is
attention to the other pieces before it: that is the drafter's approximation, which can cost
acceptance but never exactness, since the target verifies every token.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from decoding import kv_quant
from decoding.cache import KVCache
from decoding.transformer import Run, Transformer, rotate_half

# "k{layer}" / "v{layer}" -> [n_kv_heads, tokens, head_dim] (8-bit: row bytes); "start" -> [1], the position of the
# piece's first token when it was encoded (its keys carry that rotation).
PieceKV = dict[str, torch.Tensor]


def piece_length(piece: PieceKV) -> int:
    return piece["k0"].shape[1]


@torch.inference_mode()
def encode_piece(model: Transformer, tokens: Sequence[int], after: Sequence[int] = (),
                 run: Run | None = None) -> PieceKV:
    """The piece's KV read after the tokens `after` (from position 0); only the piece's slots are kept.
    run: who runs the passes (a scheduler)."""
    context = [*after, *tokens]
    cache = model.new_cache(len(context) + 1)
    model.prefill(torch.tensor(context, device=model.device), cache, run=run)
    piece = cache.slots(len(after), len(context))
    piece["start"] = torch.tensor([len(after)])
    return piece


@torch.inference_mode()
def assemble(model: Transformer, pieces: Sequence[PieceKV], capacity: int) -> KVCache:
    """A cache of at least `capacity` slots holding the pieces one after another from position 0."""
    total = sum(piece_length(p) for p in pieces)
    cache = model.new_cache(max(capacity, total))
    position = 0
    for piece in pieces:
        if piece["k0"].dtype != cache.dtype:
            raise ValueError(f"a piece of {piece['k0'].dtype} K/V for a cache of {cache.dtype} (pieces are "
                             "stored in the form of the model that encoded them)")
        end = position + piece_length(piece)
        shift = position - int(piece["start"][0])
        cos, sin = _rotation(model, shift)
        for layer in range(model.args.n_layers):
            keys = piece[f"k{layer}"]
            if shift:
                keys = _rotated(keys, cos, sin, model.args.head_dim)
            cache.keys[layer][:, position:end] = keys
            cache.values[layer][:, position:end] = piece[f"v{layer}"]
        position = end
    cache.length = cache.next_position = total
    return cache


def _rotated(keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Keys turned by a rotation's cos/sin in fp32, back in their own form; 8-bit keys are
    dequantized, turned and quantized again (see the module docstring)."""
    if kv_quant.is_quantized(keys):
        wide = kv_quant.dequantize(keys, head_dim)
        return kv_quant.quantize(wide * cos + rotate_half(wide) * sin)
    return (keys.float() * cos + rotate_half(keys.float()) * sin).to(keys.dtype)


def _rotation(model: Transformer, delta: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of RoPE's angles for a shift of `delta` positions ([head_dim], fp32; angles in fp64)."""
    angles = delta * model.inv_freq.to(torch.float64)
    angles = torch.cat((angles, angles))
    return angles.cos().float(), angles.sin().float()
