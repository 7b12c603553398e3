"""Linear layers on weights that keep a GGUF file's quantized values, for CPU decoding.

Every block format of the embedded models maps exactly, without re-quantizing, onto one of two
layouts (see kernels/quant_linear.c for the byte order):
  kind 4: 4-bit unsigned values in groups of 32, w = scale * q - min  (Q4_K)
  kind 8: 8-bit signed values in groups of 16 or 32, w = scale * q   (Q6_K: 16; Q5_0, Q8_0: 32)
with fp32 scales and mins computed exactly as gguf computes them when it dequantizes.

QuantLinear runs every call through the C kernel, whose rows do not depend on the row count (so
a decode step and a verify pass give bit-identical rows). Prefill chunks take the same kernel: on
1024-row chunks it measured level with the prepacked bf16 GEMMs and ahead of dequantizing each
weight for F.linear (`python -m bench.quant_linear --rows 1024 --engines quant,bf16,dequant`).
Without a C compiler (or with RAPIDQA_NATIVE_QUANT=0) every call dequantizes and runs F.linear,
and the model pads single rows to two, as the dense engine does.
"""

from __future__ import annotations

import ctypes
import functools
import os
import subprocess
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from decoding.attention import KERNEL_FLAGS, build_library, kernel_cache_dir

QUANT_FORMAT = 1  # bump when the layout below changes, so converted caches are rebuilt
KERNEL_SOURCE = os.path.join(os.path.dirname(__file__), "kernels", "quant_linear.c")
QUANT_FLAGS = (*KERNEL_FLAGS, "-ffp-contract=off")
TILE = 16  # output columns per tile


@dataclass
class QuantWeight:
    """One [n, k] weight in the kernel layout."""

    kind: int  # 4 or 8
    group: int
    n: int
    k: int
    q: torch.Tensor  # uint8, [n/16, k/group, tile bytes]
    scale: torch.Tensor  # fp32, [n/16, k/group, 16]
    min: torch.Tensor | None  # fp32, like scale (kind 4 only)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.q, self.scale, self.min) if t is not None)

    def meta(self) -> dict[str, int]:
        return {"kind": self.kind, "group": self.group, "n": self.n, "k": self.k}


def takes_shape(n: int, k: int) -> bool:
    return n % TILE == 0 and k % 32 == 0


# --------------------------------------------------------------------------- layout


def pack(values: np.ndarray, scale: np.ndarray, minimum: np.ndarray | None, kind: int, group: int) -> QuantWeight:
    """values [n, k] (kind 4: 0..15; kind 8: -128..127), scale/min [n, k/group] -> kernel layout."""
    n, k = values.shape
    if not takes_shape(n, k) or k % group:
        raise ValueError(f"shape {n}x{k} does not fit the kernel layout (tiles of 16 outputs, groups of {group})")
    tiles, groups = n // TILE, k // group
    if kind == 4:
        v = values.astype(np.uint8).reshape(tiles, TILE, groups, 2, 4, 4)  # input = 16 half + 4 h + b
        v = v.transpose(0, 2, 3, 4, 1, 5)  # tile, group, half, h, column, b
        q = v[:, :, 0] | (v[:, :, 1] << 4)
    elif kind == 8:
        u = (values.astype(np.int16) + 128).astype(np.uint8)
        q = u.reshape(tiles, TILE, groups, group // 4, 4).transpose(0, 2, 3, 1, 4)  # tile, group, p, column, b
    else:
        raise ValueError(f"unknown kind {kind}")

    def per_group(a: np.ndarray) -> torch.Tensor:
        grouped = a.astype(np.float32).reshape(tiles, TILE, groups).transpose(0, 2, 1)
        return torch.from_numpy(np.ascontiguousarray(grouped))

    return QuantWeight(
        kind, group, n, k, torch.from_numpy(np.ascontiguousarray(q).reshape(tiles, groups, -1)),
        per_group(scale), None if minimum is None else per_group(minimum),
    )


def _f16(a: np.ndarray) -> np.ndarray:
    return a.copy().view(np.float16).astype(np.float32)


def unpack_gguf(
    qtype: str, blocks: np.ndarray, n: int, k: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, int]:
    """A GGUF tensor's raw blocks ([n, bytes per row], uint8) -> (values, scale, min, group).

    Scales and mins are the fp32 products gguf's own dequantization forms, so
    scale * q - min reproduces gguf.quants.dequantize bit for bit.
    """
    from gguf.quants import Q4_K

    rows = blocks.reshape(n, -1)
    if qtype == "Q4_K":
        b = rows.reshape(-1, 144)
        d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
        sc, m = Q4_K.get_scale_min(b[:, 4:16].copy())
        qs = b[:, 16:].reshape(-1, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
        values = (qs & 0x0F).reshape(n, k)
        scale = (d * sc.astype(np.float32)).reshape(n, k // 32)
        minimum = (dmin * m.astype(np.float32)).reshape(n, k // 32)
        return values, scale, minimum, 32
    if qtype == "Q6_K":
        b = rows.reshape(-1, 210)
        ql, qh = b[:, :128], b[:, 128:192]
        scales = b[:, 192:208].copy().view(np.int8).astype(np.float32)
        d = _f16(b[:, 208:210])
        lo = (ql.reshape(-1, 2, 1, 64) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)) & 0x0F
        hi = (qh.reshape(-1, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)) & 0x03
        q = (lo.reshape(-1, 8, 32) | (hi.reshape(-1, 8, 32) << 4)).astype(np.int16) - 32
        return q.reshape(n, k), (d * scales).reshape(n, k // 16), None, 16
    if qtype == "Q5_0":
        b = rows.reshape(-1, 22)
        d = _f16(b[:, 0:2])
        qh = b[:, 2:6].copy().view(np.uint32).reshape(-1, 1) >> np.arange(32, dtype=np.uint32).reshape(1, 32)
        ql = (b[:, 6:22].reshape(-1, 1, 16) >> np.array([0, 4], dtype=np.uint8).reshape(1, 2, 1)) & 0x0F
        q = (ql.reshape(-1, 32) | ((qh & 1).astype(np.uint8) << 4)).astype(np.int16) - 16
        return q.reshape(n, k), d.reshape(n, k // 32), None, 32
    if qtype == "Q8_0":
        b = rows.reshape(-1, 34)
        d = _f16(b[:, 0:2])
        q = b[:, 2:].copy().view(np.int8).astype(np.int16)
        return q.reshape(n, k), d.reshape(n, k // 32), None, 32
    raise ValueError(f"GGUF type {qtype} has no exact kernel layout")


GGUF_KINDS = {"Q4_K": 4, "Q6_K": 8, "Q5_0": 8, "Q8_0": 8}


def from_gguf(qtype: str, blocks: np.ndarray, n: int, k: int) -> QuantWeight:
    values, scale, minimum, group = unpack_gguf(qtype, blocks, n, k)
    return pack(values, scale, minimum, GGUF_KINDS[qtype], group)


def quantize(weight: torch.Tensor, kind: int, group: int = 32) -> QuantWeight:
    """Round a float weight into the layout (tests build quantized tiny models with it; real
    models never re-quantize: their values come from the GGUF file)."""
    w = weight.detach().float().numpy()
    n, k = w.shape
    blocks = w.reshape(n, k // group, group)
    if kind == 4:
        lo, hi = blocks.min(-1), blocks.max(-1)
        scale = np.where(hi > lo, (hi - lo) / 15.0, 1.0).astype(np.float32)
        q = np.clip(np.rint((blocks - lo[..., None]) / scale[..., None]), 0, 15)
        return pack(q.reshape(n, k), scale, -lo.astype(np.float32), 4, group)
    amax = np.abs(blocks).max(-1)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(blocks / scale[..., None]), -127, 127)
    return pack(q.reshape(n, k), scale, None, 8, group)


def dequantize_torch(w: QuantWeight, cols: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 [len(cols) or n, k]: the reference the C dequantizer must equal (and its fallback)."""
    cols = torch.arange(w.n) if cols is None else cols.long()
    tiles, j = cols // TILE, cols % TILE
    groups = w.k // w.group
    scale = w.scale[tiles, :, j]  # [c, groups]
    if w.kind == 4:
        q = w.q.view(-1, groups, 4, TILE, 4)[tiles, :, :, j]  # [c, groups, h, b]
        values = torch.cat([q & 15, q >> 4], dim=-2).reshape(-1, groups, 32).float()
        minimum = w.min[tiles, :, j]
        return (scale[..., None] * values - minimum[..., None]).reshape(-1, w.k)
    q = w.q.view(-1, groups, w.group // 4, TILE, 4)[tiles, :, :, j]
    values = (q.int() - 128).reshape(-1, groups, w.group).float()
    return (scale[..., None] * values).reshape(-1, w.k)


# --------------------------------------------------------------------------- native kernel


class NativeQuant:
    """ctypes binding of kernels/quant_linear.c."""

    def __init__(self, library: ctypes.CDLL) -> None:
        p, i, i64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
        self._quantize = library.rq_quantize_rows
        self._quantize.argtypes = [p, i, i, i, p, p, p, p, i]
        self._linear = library.rq_linear
        self._linear.argtypes = [p, p, p, p, i, i, p, p, p, i, i, i, p, p, i64, i]
        self._dequantize = library.rq_dequantize
        self._dequantize.argtypes = [p, p, p, i, i, i, i, p, i, p, i, i]
        for fn in (self._quantize, self._linear, self._dequantize):
            fn.restype = ctypes.c_int
        self.vnni = bool(ctypes.c_int.in_dll(library, "rq_vnni").value)

    def linear(self, x: torch.Tensor, parts: list[QuantWeight], bias: torch.Tensor | None) -> torch.Tensor:
        """fp32 [rows, sum of n] = x [rows, k] @ W^T (+ bias); parts stack along the outputs."""
        x = x.contiguous()
        rows, k = x.shape
        if x.dtype not in (torch.bfloat16, torch.float32):
            x = x.float()
        threads = torch.get_num_threads()
        xq = torch.empty(rows, k, dtype=torch.int8)
        xs = torch.empty(rows, k // 32, dtype=torch.float32)
        bsum = torch.empty(rows, k // 16, dtype=torch.int32)
        xsb = torch.empty(rows, k // 32, dtype=torch.float32)
        if self._quantize(x.data_ptr(), int(x.dtype == torch.bfloat16), rows, k, xq.data_ptr(), xs.data_ptr(),
                          bsum.data_ptr(), xsb.data_ptr(), threads):
            raise RuntimeError(f"quant kernel rejected k={k}")
        n_total = sum(w.n for w in parts)
        y = torch.empty(rows, n_total, dtype=torch.float32)
        offset = 0
        for w in parts:
            status = self._linear(
                xq.data_ptr(), xs.data_ptr(), bsum.data_ptr(), xsb.data_ptr(), rows, k, w.q.data_ptr(),
                w.scale.data_ptr(), None if w.min is None else w.min.data_ptr(), w.kind, w.group, w.n,
                None if bias is None else bias[offset:].data_ptr(), y[:, offset:].data_ptr(), n_total, threads,
            )
            if status:
                raise RuntimeError(f"quant kernel rejected a {w.n}x{w.k} kind-{w.kind} weight")
            offset += w.n
        return y

    def dequantize(self, w: QuantWeight, cols: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        count = w.n if cols is None else cols.numel()
        index = None if cols is None else cols.to(torch.int64).contiguous()
        out_bf16 = dtype == torch.bfloat16
        out = torch.empty(count, w.k, dtype=torch.bfloat16 if out_bf16 else torch.float32)
        status = self._dequantize(
            w.q.data_ptr(), w.scale.data_ptr(), None if w.min is None else w.min.data_ptr(), w.kind, w.group, w.n,
            w.k, None if index is None else index.data_ptr(), count, out.data_ptr(), int(out_bf16),
            torch.get_num_threads(),
        )
        if status:
            raise RuntimeError("quant dequantize rejected its input")
        return out if out.dtype == dtype else out.to(dtype)


@functools.cache
def native_quant() -> NativeQuant | None:
    """The compiled kernel, or None when disabled or not buildable here (the torch path runs then)."""
    if os.environ.get("RAPIDQA_NATIVE_QUANT", "1") == "0":
        return None
    try:
        library = build_library(KERNEL_SOURCE, QUANT_FLAGS, kernel_cache_dir(), "quant_linear")
        return NativeQuant(ctypes.CDLL(str(library)))
    except (OSError, RuntimeError, subprocess.SubprocessError):
        return None


def dequantize(w: QuantWeight, dtype: torch.dtype = torch.float32, cols: torch.Tensor | None = None) -> torch.Tensor:
    kernel = native_quant()
    if kernel is not None:
        return kernel.dequantize(w, cols, dtype)
    return dequantize_torch(w, cols).to(dtype)


# --------------------------------------------------------------------------- modules


class QuantLinear(nn.Module):
    """y = x W^T + b with W in the kernel layout; one or more weights stacked along the outputs
    (a fused q/k/v may mix 4-bit and 8-bit parts, as Q4_K_M files do)."""

    def __init__(self, parts: list[QuantWeight], bias: torch.Tensor | None, out_dtype: torch.dtype | None = None):
        super().__init__()
        if len({w.k for w in parts}) != 1:
            raise ValueError("stacked weights must share their input size")
        self.parts = parts
        self.in_features, self.out_features = parts[0].k, sum(w.n for w in parts)
        self.bias = None if bias is None else bias.detach().float().contiguous()
        self.out_dtype = out_dtype  # None: the input's dtype

    @property
    def nbytes(self) -> int:
        return sum(w.nbytes for w in self.parts)

    def dense(self, dtype: torch.dtype) -> torch.Tensor:
        return torch.cat([dequantize(w, dtype) for w in self.parts])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out_dtype = self.out_dtype or x.dtype
        kernel = native_quant()
        if kernel is not None and x.device.type == "cpu":
            return kernel.linear(x, self.parts, self.bias).to(out_dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dense(x.dtype), bias).to(out_dtype)


class QuantEmbedding(nn.Module):
    """Token embeddings kept quantized; looked-up rows are dequantized to the model's dtype."""

    def __init__(self, weight: QuantWeight, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight_q, self.dtype = weight, dtype

    @property
    def nbytes(self) -> int:
        return self.weight_q.nbytes

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return dequantize(self.weight_q, self.dtype, tokens.reshape(-1)).view(*tokens.shape, -1)


def quantized_bytes(model: nn.Module) -> int:
    """Bytes of quantized weights held by a model's QuantLinear / QuantEmbedding modules (shared ones once)."""
    seen: set[int] = set()
    total = 0
    for module in model.modules():
        weights = module.parts if isinstance(module, QuantLinear) else (
            [module.weight_q] if isinstance(module, QuantEmbedding) else [])
        for w in weights:
            if id(w) not in seen:
                seen.add(id(w))
                total += w.nbytes
    return total


# --------------------------------------------------------------------------- whole models


@dataclass
class QuantizedState:
    """A model's weights in the kernel layout: linears by engine module name (fused q/k/v and
    gate/up stack their GGUF tensors as parts), plus fp32 biases and norms."""

    linears: dict[str, list[QuantWeight]]
    dense: dict[str, torch.Tensor]  # biases and norm weights, fp32
    tied_lm_head: bool  # the file has no output.weight: lm_head reads the embedding table

    def to_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, list[dict[str, int]]]]:
        tensors = dict(self.dense)
        layout: dict[str, list[dict[str, int]]] = {}
        for name, parts in self.linears.items():
            layout[name] = [w.meta() for w in parts]
            for i, w in enumerate(parts):
                tensors[f"{name}.{i}.q"], tensors[f"{name}.{i}.scale"] = w.q, w.scale
                if w.min is not None:
                    tensors[f"{name}.{i}.min"] = w.min
        return tensors, layout

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], layout: dict[str, list[dict[str, int]]],
                     tied_lm_head: bool) -> QuantizedState:
        linears = {
            name: [QuantWeight(m["kind"], m["group"], m["n"], m["k"], tensors[f"{name}.{i}.q"],
                               tensors[f"{name}.{i}.scale"], tensors.get(f"{name}.{i}.min"))
                   for i, m in enumerate(parts)]
            for name, parts in layout.items()
        }
        dense = {k: v for k, v in tensors.items() if not k.endswith((".q", ".scale", ".min"))}
        return cls(linears, dense, tied_lm_head)


class UnsupportedQuantization(ValueError):
    """The GGUF holds a tensor type or shape without an exact kernel layout."""


def state_from_gguf(tensors: dict, n_layers: int, architecture: str) -> QuantizedState:
    """Engine weights from a llama-family GGUF's tensors (gguf.ReaderTensor-like: .tensor_type.name,
    .data, .shape with the input size first). Raises UnsupportedQuantization where a tensor has
    no exact layout; the caller then keeps the bf16 engine."""

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
        linears[p + "qkv"] = [weight(b + f"attn_{x}.weight") for x in "qkv"]
        if b + "attn_q.bias" in tensors:
            out[p + "qkv.bias"] = torch.cat([dense(b + f"attn_{x}.bias") for x in "qkv"])
        linears[p + "o_proj"] = [weight(b + "attn_output.weight")]
        linears[p + "gate_up"] = [weight(b + "ffn_gate.weight"), weight(b + "ffn_up.weight")]
        linears[p + "down"] = [weight(b + "ffn_down.weight")]
        out[p + "attn_norm.weight"] = dense(b + "attn_norm.weight")
        out[p + "mlp_norm.weight"] = dense(b + "ffn_norm.weight")
    return QuantizedState(linears, out, tied)
