"""Reading a GGUF file's quantized tensors into the kernel layouts of decoding.quant, exactly.

unpack_gguf turns a tensor's raw blocks into its values and two-level scales unchanged; from_gguf
packs them into a QuantWeight; state_from_gguf builds a whole model's QuantizedState.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from decoding.quant import QuantizedState, QuantWeight, pack, stacked, takes_shape


def _f16(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a).view(np.float16)


@dataclass
class Unpacked:
    """A GGUF tensor's values and scales, as pack() takes them."""

    values: np.ndarray  # [n, k]
    d: np.ndarray  # fp16 [n, super-blocks]
    sub: np.ndarray | None  # int8 [n, k/group]
    group: int
    per: int
    dmin: np.ndarray | None = None
    msub: np.ndarray | None = None

    def scales(self) -> tuple[np.ndarray, np.ndarray | None]:
        """fp32 scale and min per group: the products gguf's own dequantization forms."""
        def level(top: np.ndarray, sub: np.ndarray | None) -> np.ndarray:
            full = np.repeat(top.astype(np.float32), self.per, axis=1)[:, : self.values.shape[1] // self.group]
            return full if sub is None else full * sub.astype(np.float32)
        return level(self.d, self.sub), None if self.dmin is None else level(self.dmin, self.msub)


def unpack_gguf(qtype: str, blocks: np.ndarray, n: int, k: int) -> Unpacked:
    """A GGUF tensor's raw blocks ([n, bytes per row], uint8) -> its values and two-level scales,
    unchanged (scale * q - min in fp32 reproduces gguf.quants.dequantize bit for bit)."""
    from gguf.quants import Q4_K

    rows = blocks.reshape(n, -1)
    if qtype == "Q4_K":
        b = rows.reshape(-1, 144)
        d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
        sc, m = Q4_K.get_scale_min(b[:, 4:16].copy())  # 6-bit: they fit int8
        qs = b[:, 16:].reshape(-1, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
        values = (qs & 0x0F).reshape(n, k)
        return Unpacked(values, d.reshape(n, k // 256), sc.astype(np.int8).reshape(n, k // 32), 32, 8,
                        dmin.reshape(n, k // 256), m.astype(np.int8).reshape(n, k // 32))
    if qtype == "Q6_K":
        b = rows.reshape(-1, 210)
        ql, qh = b[:, :128], b[:, 128:192]
        scales = b[:, 192:208].copy().view(np.int8)
        d = _f16(b[:, 208:210])
        lo = (ql.reshape(-1, 2, 1, 64) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)) & 0x0F
        hi = (qh.reshape(-1, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)) & 0x03
        q = (lo.reshape(-1, 8, 32) | (hi.reshape(-1, 8, 32) << 4)).astype(np.int16) - 32
        return Unpacked(q.reshape(n, k), d.reshape(n, k // 256), scales.reshape(n, k // 16), 16, 16)
    if qtype == "Q5_0":
        b = rows.reshape(-1, 22)
        d = _f16(b[:, 0:2])
        qh = b[:, 2:6].copy().view(np.uint32).reshape(-1, 1) >> np.arange(32, dtype=np.uint32).reshape(1, 32)
        ql = (b[:, 6:22].reshape(-1, 1, 16) >> np.array([0, 4], dtype=np.uint8).reshape(1, 2, 1)) & 0x0F
        q = (ql.reshape(-1, 32) | ((qh & 1).astype(np.uint8) << 4)).astype(np.int16) - 16
        return Unpacked(q.reshape(n, k), d.reshape(n, k // 32), None, 32, 1)
    if qtype == "Q8_0":
        b = rows.reshape(-1, 34)
        d = _f16(b[:, 0:2])
        q = b[:, 2:].copy().view(np.int8).astype(np.int16)
        return Unpacked(q.reshape(n, k), d.reshape(n, k // 32), None, 32, 1)
    raise ValueError(f"GGUF type {qtype} has no exact kernel layout")


GGUF_KINDS = {"Q4_K": 4, "Q6_K": 6, "Q5_0": 5, "Q8_0": 8}


def from_gguf(qtype: str, blocks: np.ndarray, n: int, k: int) -> QuantWeight:
    u = unpack_gguf(qtype, blocks, n, k)
    return pack(u.values, u.d, u.sub, GGUF_KINDS[qtype], u.group, u.per, u.dmin, u.msub)


class UnsupportedQuantization(ValueError):
    """The GGUF holds a tensor type or shape without an exact kernel layout."""


def state_from_gguf(tensors: dict, n_layers: int, architecture: str,
                    progress: Callable[[int, int], None] | None = None) -> QuantizedState:
    """Engine weights from a llama-family GGUF's tensors (gguf.ReaderTensor-like: .tensor_type.name,
    .data, .shape with the input size first). Raises UnsupportedQuantization where a tensor has
    no exact layout; the caller then keeps the bf16 engine. progress, when given, is called with
    (layers done, layers total) after each layer."""

    # llama.cpp stores Llama-style q/k rows permuted for its RoPE; Qwen2's are stored as they are.
    if architecture != "qwen2":
        raise UnsupportedQuantization(f"quantized weights are read for qwen2 GGUF files only, not {architecture}")

    def weight(name: str) -> QuantWeight:
        t = tensors[name]
        qtype = t.tensor_type.name
        k, n = int(t.shape[0]), int(t.shape[1])
        if qtype not in GGUF_KINDS or not takes_shape(n, k):
            raise UnsupportedQuantization(f"{name}: {qtype} {n}x{k} has no exact kernel layout")
        return from_gguf(qtype, t.data, n, k)

    def dense(name: str) -> torch.Tensor:
        t = tensors[name]
        if t.tensor_type.name != "F32":
            raise UnsupportedQuantization(f"{name}: expected F32, found {t.tensor_type.name}")
        return torch.from_numpy(np.array(t.data, dtype=np.float32).reshape(-1))

    linears: dict[str, list[QuantWeight]] = {"embed": [weight("token_embd.weight")]}
    out: dict[str, torch.Tensor] = {"norm.weight": dense("output_norm.weight")}
    tied = "output.weight" not in tensors
    if not tied:
        linears["lm_head"] = [weight("output.weight")]
    for i in range(n_layers):
        b, p = f"blk.{i}.", f"layers.{i}."
        linears[p + "qkv"] = stacked([weight(b + f"attn_{x}.weight") for x in "qkv"])
        if b + "attn_q.bias" in tensors:
            out[p + "qkv.bias"] = torch.cat([dense(b + f"attn_{x}.bias") for x in "qkv"])
        linears[p + "o_proj"] = [weight(b + "attn_output.weight")]
        linears[p + "gate_up"] = stacked([weight(b + "ffn_gate.weight"), weight(b + "ffn_up.weight")])
        linears[p + "down"] = [weight(b + "ffn_down.weight")]
        out[p + "attn_norm.weight"] = dense(b + "attn_norm.weight")
        out[p + "mlp_norm.weight"] = dense(b + "ffn_norm.weight")
        if progress is not None:
            progress(i + 1, n_layers)
    return QuantizedState(linears, out, tied)
