"""The 8-bit K/V form: per token and K/V head, D int8 values then D/32 bf16 scales, in one byte row.

A value is scale * q for its group of 32 channels (as llama.cpp's Q8_0, with a bf16 scale), so a
head's row takes D + D/16 bytes instead of bf16's 2 D. Keeping values and scales in one uint8 row
lets a cache slice, crop, copy and store the 8-bit form exactly as it does bf16 K/V: every slot
operation works on the slot axis alone. A K/V tensor of dtype STORAGE is in this form.

Quantizing is elementwise per group, so a token's bytes do not depend on how many tokens are
written with it: a verify pass stores what the decode steps would have stored. A cache writes its
new tokens with `write`: on a CPU the C kernel kernels/kv_quant.c computes quantize's bits straight
into the cache's slots (torch's dozen small ops per layer cost more than a decode step's write).
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from decoding.native import load_kernel

GROUP = 32  # channels per scale
STORAGE = torch.uint8  # the dtype of an 8-bit K/V tensor
KERNEL_SOURCE = Path(__file__).with_name("kernels") / "kv_quant.c"


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


def write(k: torch.Tensor, v: torch.Tensor, key_slots: torch.Tensor, value_slots: torch.Tensor) -> None:
    """Store new K and V ([n_kv, T, D], any float dtype) in 8-bit slots ([n_kv, T, row_bytes(D)]
    views of a cache): quantize's bytes, by the C kernel where it takes the tensors."""
    kernel = native_kv_quant() if k.device.type == "cpu" else None
    if kernel is not None and kernel.takes(k, v, key_slots, value_slots):
        kernel(k, v, key_slots, value_slots)
        return
    key_slots.copy_(quantize(k))
    value_slots.copy_(quantize(v))


class NativeKVQuant:
    """ctypes binding of kernels/kv_quant.c."""

    def __init__(self, library: ctypes.CDLL) -> None:
        self._fn = library.rq_quantize_kv
        self._fn.restype = ctypes.c_int
        self._fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_int64,
                             ctypes.c_int, ctypes.POINTER(ctypes.c_int64), ctypes.c_void_p, ctypes.c_void_p,
                             ctypes.c_int64]

    @staticmethod
    def takes(k: torch.Tensor, v: torch.Tensor, key_slots: torch.Tensor, value_slots: torch.Tensor) -> bool:
        """bf16 or fp32 K and V of one shape with contiguous channels, into uint8 slots of one
        layout whose tokens are whole rows apart."""
        if k.dtype not in (torch.bfloat16, torch.float32) or v.dtype != k.dtype or k.dim() != 3:
            return False
        if k.shape != v.shape or k.stride(2) != 1 or v.stride(2) != 1 or k.shape[2] % GROUP:
            return False
        rows = (*k.shape[:2], row_bytes(k.shape[2]))
        return all(s.dtype == STORAGE and tuple(s.shape) == rows and s.stride(2) == 1 and s.stride(1) == rows[2]
                   and s.stride(0) == key_slots.stride(0) for s in (key_slots, value_slots))

    def __call__(self, k: torch.Tensor, v: torch.Tensor, key_slots: torch.Tensor, value_slots: torch.Tensor) -> None:
        strides = (ctypes.c_int64 * 4)(k.stride(0), k.stride(1), v.stride(0), v.stride(1))
        status = self._fn(k.data_ptr(), v.data_ptr(), int(k.dtype == torch.bfloat16), k.shape[0], k.shape[1],
                          k.shape[2], strides, key_slots.data_ptr(), value_slots.data_ptr(), key_slots.stride(0))
        if status:
            raise ValueError(f"the 8-bit K/V kernel refused head_dim {k.shape[2]}")


@functools.cache
def kv_quant_kernel() -> tuple[NativeKVQuant | None, str]:
    """The compiled kernel, or None and why not: quantize's torch ops run then. It follows the
    attention kernel's switch, as both serve the CPU's 8-bit cache."""
    loaded = load_kernel(KERNEL_SOURCE, "kv_quant", "RAPIDQA_NATIVE_ATTENTION")
    return (None if loaded.library is None else NativeKVQuant(loaded.library)), loaded.reason


def native_kv_quant() -> NativeKVQuant | None:
    return kv_quant_kernel()[0]
