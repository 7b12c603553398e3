"""The 8-bit K/V form: per token and K/V head, D int8 values then D/32 bf16 scales, in one byte row.

A value is scale * q for its group of 32 channels (as llama.cpp's Q8_0, with a bf16 scale), so a
head's row takes D + D/16 bytes instead of bf16's 2 D. Keeping values and scales in one uint8 row
lets a cache slice, crop, copy and store the 8-bit form exactly as it does bf16 K/V: every slot
operation works on the slot axis alone. A K/V tensor of dtype STORAGE is in this form.

Quantizing is elementwise per group, so a token's bytes do not depend on how many tokens are
written with it: a verify pass stores what the decode steps would have stored.
"""

from __future__ import annotations

import torch

GROUP = 32  # channels per scale
STORAGE = torch.uint8  # the dtype of an 8-bit K/V tensor


def row_bytes(head_dim: int) -> int:
    """Bytes of one token's head: the int8 values, then a bf16 scale per GROUP of them."""
    if head_dim % GROUP:
        raise ValueError(f"8-bit K/V needs a head_dim that is a multiple of {GROUP}, not {head_dim}")
    return head_dim + 2 * (head_dim // GROUP)


def is_quantized(kv: torch.Tensor) -> bool:
    return kv.dtype == STORAGE


def quantize(x: torch.Tensor) -> torch.Tensor:
    """x [..., D] (any float dtype) -> its 8-bit form [..., row_bytes(D)] (STORAGE).

    scale = max |x| / 127 over the group, rounded to bf16; q = round(x / scale) clamped to +-127
    (the rounded scale can put the largest value a hair past 127)."""
    d = x.shape[-1]
    lead = x.shape[:-1]
    groups = x.float().reshape(*lead, d // GROUP, GROUP)
    scale = (groups.abs().amax(-1, keepdim=True) / 127).to(torch.bfloat16)
    wide = scale.float()
    q = torch.where(wide > 0, groups / wide, torch.zeros_like(groups)).round_().clamp_(-127, 127).to(torch.int8)
    packed = torch.empty(*lead, row_bytes(d), dtype=STORAGE, device=x.device)
    packed[..., :d] = q.reshape(*lead, d).view(STORAGE)
    packed[..., d:] = scale.reshape(*lead, d // GROUP).view(STORAGE)
    return packed


def dequantize(packed: torch.Tensor, head_dim: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The values an 8-bit [..., row_bytes(head_dim)] tensor stands for, [..., head_dim] in dtype."""
    if packed.shape[-1] != row_bytes(head_dim):
        raise ValueError(f"8-bit K/V rows of {packed.shape[-1]} bytes do not hold head_dim {head_dim}")
    lead = packed.shape[:-1]
    data = packed.contiguous()
    q = data[..., :head_dim].view(torch.int8).float().reshape(*lead, head_dim // GROUP, GROUP)
    scale = data[..., head_dim:].view(torch.bfloat16).float().unsqueeze(-1)
    return (q * scale).reshape(*lead, head_dim).to(dtype)
