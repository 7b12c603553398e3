"""Linear layers on weights that keep a GGUF file's quantized values, for CPU decoding.

Every block format of the embedded models maps exactly, without re-quantizing, onto one of four
layouts (see kernels/quant_linear.c for the byte order):
  kind 4: 4-bit unsigned values in groups of 32, w = scale * q - min  (Q4_K)
  kind 5: 5-bit signed values in groups of 32, w = scale * q          (Q5_0)
  kind 6: 6-bit signed values in groups of 16, w = scale * q          (Q6_K)
  kind 8: 8-bit signed values in groups of 32, w = scale * q          (Q8_0; groups of 16 also run)
Scales keep the file's own form: an fp16 scale per super-block times an int8 sub-scale per group
(Q4_K's scales and mins, Q6_K's scales), or an fp16 scale per group (Q5_0, Q8_0). Their fp32
products are exact, so they equal what gguf forms when it dequantizes.

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
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from decoding import rowwise
from decoding.native import load_kernel

QUANT_FORMAT = 5  # bump when the layout below changes, so converted caches are rebuilt
KERNEL_SOURCE = os.path.join(os.path.dirname(__file__), "kernels", "quant_linear.c")
TILE = 16  # output columns per tile


_FIELDS = ("q", "d", "sub", "dmin", "msub")  # a QuantWeight's tensors, in the order the C functions take them


@dataclass
class QuantWeight:
    """One [n, k] weight in the kernel layout."""

    kind: int  # 4, 5, 6 or 8
    group: int
    n: int
    k: int
    q: torch.Tensor  # uint8, [n/16, k/group, tile bytes] (kind 6: [n/16, k/32, 384])
    d: torch.Tensor  # fp16, [n/16, super-blocks, 16]: the scale, times sub when there is one
    sub: torch.Tensor | None  # int8, [n/16, k/group, 16]; None when per == 1
    dmin: torch.Tensor | None  # like d, for the min (kind 4 only)
    msub: torch.Tensor | None  # like sub, for the min
    per: int  # groups per super-block

    @property
    def tensors(self) -> dict[str, torch.Tensor]:
        named = {name: getattr(self, name) for name in _FIELDS}
        return {name: t for name, t in named.items() if t is not None}

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def meta(self) -> dict[str, int]:
        return {"kind": self.kind, "group": self.group, "n": self.n, "k": self.k, "per": self.per}

    def check(self, name: str) -> None:
        """Raise ValueError, naming the tensor, unless the layout is one the kernels take and every
        tensor has the shape and dtype it implies (the kernels trust both: a file that disagrees
        must be refused here, not read out of bounds)."""
        if (self.group not in {4: (32,), 5: (32,), 6: (16,), 8: (16, 32)}.get(self.kind, ())
                or not takes_shape(self.n, self.k) or self.n <= 0 or self.k <= 0 or self.per < 1
                or (self.kind == 5 and self.per != 1)):
            raise ValueError(f"{name}: kind {self.kind}, group {self.group}, per {self.per}, {self.n}x{self.k} "
                             "is not a kernel layout")
        tiles, groups = self.n // TILE, self.k // self.group
        supers = -(-groups // self.per)
        unit_bytes = {4: 256, 5: 320, 6: 384}.get(self.kind, 16 * self.group)
        scale_shape, sub_shape = (tiles, supers, TILE), (tiles, groups, TILE)
        expected = {
            "q": (torch.uint8, (tiles, self.k // 32 if self.kind == 6 else groups, unit_bytes)),
            "d": (torch.float16, scale_shape),
            "sub": None if self.per == 1 else (torch.int8, sub_shape),
            "dmin": (torch.float16, scale_shape) if self.kind == 4 else None,
            "msub": (torch.int8, sub_shape) if self.kind == 4 and self.per != 1 else None,
        }
        for field in _FIELDS:
            t, want = getattr(self, field), expected[field]
            if want is None:
                if t is not None:
                    raise ValueError(f"{name}.{field}: present, but a kind-{self.kind} weight with per "
                                     f"{self.per} has none")
            elif t is None or t.dtype != want[0] or tuple(t.shape) != want[1] or not t.is_contiguous():
                found = "missing" if t is None else f"{t.dtype} {tuple(t.shape)}"
                raise ValueError(f"{name}.{field}: expected {want[0]} {want[1]} for a {self.n}x{self.k} "
                                 f"kind-{self.kind} weight, found {found}")

    @property
    def kernel_args(self) -> tuple[int | None, ...]:
        """q, d, sub, dmin, msub pointers (None where absent), per, kind, group, n and k, as the C
        functions take them; formed once and re-formed only if the tensors were replaced."""
        args = self.__dict__.get("_kernel_args")
        if args is None or args[0] != self.q.data_ptr():
            pointers = (None if (t := getattr(self, name)) is None else t.data_ptr() for name in _FIELDS)
            args = self.__dict__["_kernel_args"] = (*pointers, self.per, self.kind, self.group, self.n, self.k)
        return args


def stacked(parts: list[QuantWeight]) -> list[QuantWeight]:
    """Adjacent parts of one layout joined into one weight (their tiles simply follow each other),
    so a fused q/k/v or gate/up costs one kernel call where the file's types allow."""
    out: list[QuantWeight] = []
    for w in parts:
        last = out[-1] if out else None
        if last is None or (last.kind, last.group, last.k, last.per) != (w.kind, w.group, w.k, w.per):
            out.append(w)
            continue
        joined = {name: None if (t := getattr(last, name)) is None else torch.cat([t, getattr(w, name)])
                  for name in _FIELDS}
        out[-1] = QuantWeight(w.kind, w.group, last.n + w.n, w.k, per=w.per, **joined)
    return out


def takes_shape(n: int, k: int) -> bool:
    return n % TILE == 0 and k % 32 == 0


# --------------------------------------------------------------------------- layout


def pack(values: np.ndarray, d: np.ndarray, sub: np.ndarray | None, kind: int, group: int, per: int = 1,
         dmin: np.ndarray | None = None, msub: np.ndarray | None = None) -> QuantWeight:
    """values [n, k] (kind 4: 0..15; kind 5: -16..15; kind 6: -32..31; kind 8: -128..127); d, dmin fp16
    [n, super-blocks of `per` groups]; sub, msub int8 [n, k/group] (None when per is 1) -> kernel layout."""
    n, k = values.shape
    if not takes_shape(n, k) or k % group:
        raise ValueError(f"shape {n}x{k} does not fit the kernel layout (tiles of 16 outputs, groups of {group})")
    mins_match = (dmin is not None) == (kind == 4) and (kind != 4 or (msub is None) == (sub is None))
    if (sub is None) != (per == 1) or not mins_match:
        raise ValueError("sub-scales come with super-blocks of several groups; mins with 4-bit weights only")
    tiles, groups = n // TILE, k // group
    supers = -(-groups // per)
    if kind == 4:
        v = values.astype(np.uint8).reshape(tiles, TILE, groups, 2, 4, 4)  # input = 16 half + 4 h + b
        v = v.transpose(0, 2, 3, 4, 1, 5)  # tile, group, half, h, column, b
        q = v[:, :, 0] | (v[:, :, 1] << 4)
    elif kind == 5 and group == 32 and per == 1:
        u = (values.astype(np.int16) + 16).astype(np.uint8).reshape(tiles, TILE, groups, 2, 4, 4)
        u = u.transpose(0, 2, 3, 4, 1, 5)  # tile, group, half, h, column, b
        low = (u[:, :, 0] & 15) | ((u[:, :, 1] & 15) << 4)  # [tile, group, h, column, b]
        bit = (4 * np.arange(2, dtype=np.uint8).reshape(1, 1, 2, 1, 1, 1)
               + np.arange(4, dtype=np.uint8).reshape(1, 1, 1, 4, 1, 1))
        fifth = ((u >> 4) << bit).sum((2, 3), dtype=np.uint8)  # [tile, group, column, b]
        q = np.concatenate([low.reshape(tiles, groups, 256), fifth.reshape(tiles, groups, 64)], axis=-1)
    elif kind == 6 and group == 16:
        u = (values.astype(np.int16) + 32).astype(np.uint8).reshape(tiles, TILE, k // 32, 2, 4, 4)
        u = u.transpose(0, 2, 3, 4, 1, 5)  # tile, 32 inputs, half, h, column, b
        low = (u[:, :, 0] & 15) | ((u[:, :, 1] & 15) << 4)  # [tile, 32 inputs, h, column, b]
        crumbs = ((u >> 4) << (2 * np.arange(4, dtype=np.uint8)).reshape(1, 1, 1, 4, 1, 1)).sum(3, dtype=np.uint8)
        q = np.concatenate([low.reshape(tiles, k // 32, 256), crumbs.reshape(tiles, k // 32, 128)], axis=-1)
    elif kind == 8:
        u = (values.astype(np.int16) + 128).astype(np.uint8)
        q = u.reshape(tiles, TILE, groups, group // 4, 4).transpose(0, 2, 3, 1, 4)  # tile, group, p, column, b
    else:
        raise ValueError(f"no layout for kind {kind} with groups of {group} (per {per})")

    def per_tile(a: np.ndarray | None, dtype: type, count: int) -> torch.Tensor | None:
        if a is None:
            return None
        tiled = a.astype(dtype).reshape(tiles, TILE, count).transpose(0, 2, 1)
        return torch.from_numpy(np.ascontiguousarray(tiled))

    return QuantWeight(
        kind, group, n, k,
        torch.from_numpy(np.ascontiguousarray(q).reshape(tiles, k // 32 if kind == 6 else groups, -1)),
        per_tile(d, np.float16, supers), per_tile(sub, np.int8, groups),
        per_tile(dmin, np.float16, supers), per_tile(msub, np.int8, groups), per,
    )


def _two_level(scale: np.ndarray, per: int) -> tuple[np.ndarray, np.ndarray]:
    """fp32 [n, groups] -> fp16 per super-block of `per` groups and int8 per group, product ~ scale."""
    n, groups = scale.shape
    supers = -(-groups // per)
    padded = np.zeros((n, supers * per), np.float32)
    padded[:, :groups] = scale
    top = np.abs(padded).reshape(n, supers, per).max(-1) / 127
    d = top.astype(np.float16)
    d = np.where(d > 0, d, np.float16(1)).astype(np.float16)
    sub = np.clip(np.rint(scale / np.repeat(d.astype(np.float32), per, axis=1)[:, :groups]), -127, 127)
    return d, sub.astype(np.int8)


def quantize(weight: torch.Tensor, kind: int, group: int = 32) -> QuantWeight:
    """Round a float weight into the layout (tests build quantized tiny models with it; real
    models never re-quantize: their values come from the GGUF file). Two-level scales as in
    Q4_K (kind 4) and Q6_K (kind 6, groups of 16); fp16 per group as in Q5_0 (kind 5) and Q8_0
    (kind 8, group 32)."""
    group = 16 if kind == 6 else group
    w = weight.detach().float().numpy()
    n, k = w.shape
    blocks = w.reshape(n, k // group, group)
    per = 256 // group if kind in (4, 6) or group == 16 else 1

    def expand(top: np.ndarray, sub: np.ndarray) -> np.ndarray:
        return np.repeat(top.astype(np.float32), per, axis=1)[:, : k // group] * sub.astype(np.float32)

    if kind == 4:
        lo, hi = blocks.min(-1), blocks.max(-1)
        d, sub = _two_level(np.where(hi > lo, (hi - lo) / 15.0, 0.0).astype(np.float32), per)
        sub = np.maximum(sub, 1).astype(np.int8)
        dmin, msub = _two_level(-lo, per)
        scale, minimum = expand(d, sub), expand(dmin, msub)
        q = np.clip(np.rint((blocks + minimum[..., None]) / scale[..., None]), 0, 15)
        return pack(q.reshape(n, k), d, sub, 4, group, per, dmin, msub)
    top_q = {5: 15, 6: 31}.get(kind, 127)
    amax = np.abs(blocks).max(-1)
    if per == 1:
        d, sub = (amax / top_q).astype(np.float16), None
        d = np.where(d > 0, d, np.float16(1)).astype(np.float16)
        scale = d.astype(np.float32)
    else:
        d, sub = _two_level((amax / top_q).astype(np.float32), per)
        sub = np.maximum(sub, 1).astype(np.int8)
        scale = expand(d, sub)
    q = np.clip(np.rint(blocks / scale[..., None]), -top_q - (kind in (5, 6)), top_q)
    return pack(q.reshape(n, k), d, sub, kind, group, per)


def _group_scales(top: torch.Tensor, sub: torch.Tensor | None, per: int, tiles: torch.Tensor, j: torch.Tensor,
                  groups: int) -> torch.Tensor:
    """fp32 [c, groups]: the kernel's scale (or min) per column and group."""
    full = top[tiles, :, j].float().repeat_interleave(per, dim=1)[:, :groups]
    return full if sub is None else full * sub[tiles, :, j].float()


def dequantize_torch(w: QuantWeight, cols: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 [len(cols) or n, k]: the reference the C dequantizer must equal (and its fallback)."""
    cols = torch.arange(w.n) if cols is None else cols.long()
    tiles, j = cols // TILE, cols % TILE
    groups = w.k // w.group
    scale = _group_scales(w.d, w.sub, w.per, tiles, j, groups)  # [c, groups]
    if w.kind == 4:
        q = w.q.view(-1, groups, 4, TILE, 4)[tiles, :, :, j]  # [c, groups, h, b]
        values = torch.cat([q & 15, q >> 4], dim=-2).reshape(-1, groups, 32).float()
        minimum = _group_scales(w.dmin, w.msub, w.per, tiles, j, groups)
        return (scale[..., None] * values - minimum[..., None]).reshape(-1, w.k)
    if w.kind == 5:
        q = w.q.view(-1, groups, 320)
        low = q[:, :, :256].reshape(-1, groups, 4, TILE, 4)[tiles, :, :, j]  # [c, groups, h, b]
        fifth = q[:, :, 256:].reshape(-1, groups, TILE, 4)[tiles, :, j]  # [c, groups, b]
        bit = 4 * torch.arange(2, dtype=torch.uint8).view(2, 1) + torch.arange(4, dtype=torch.uint8)
        shifts = bit.view(1, 1, 2, 4, 1)  # input 16 half + 4 h + b: bit 4 half + h
        high = (fifth[:, :, None, None, :] >> shifts) & 1  # [c, groups, half, h, b]
        nibbles = torch.stack([low & 15, low >> 4], dim=2)  # [c, groups, half, h, b]
        values = ((nibbles | (high << 4)).int() - 16).reshape(-1, groups, 32).float()
        return (scale[..., None] * values).reshape(-1, w.k)
    if w.kind == 6:
        q = w.q.view(-1, w.k // 32, 384)
        low = q[:, :, :256].reshape(-1, w.k // 32, 4, TILE, 4)[tiles, :, :, j]  # [c, 32 inputs, h, b]
        crumbs = q[:, :, 256:].reshape(-1, w.k // 32, 2, TILE, 4)[tiles, :, :, j]  # [c, 32 inputs, half, b]
        shifts = (2 * torch.arange(4, dtype=torch.uint8)).view(1, 1, 1, 4, 1)
        high = (crumbs[:, :, :, None, :] >> shifts) & 3  # [c, 32 inputs, half, h, b]
        nibbles = torch.stack([low & 15, low >> 4], dim=2)  # [c, 32 inputs, half, h, b]
        values = ((nibbles | (high << 4)).int() - 32).reshape(-1, groups, 16).float()
        return (scale[..., None] * values).reshape(-1, w.k)
    q = w.q.view(-1, groups, w.group // 4, TILE, 4)[tiles, :, :, j]
    values = (q.int() - 128).reshape(-1, groups, w.group).float()
    return (scale[..., None] * values).reshape(-1, w.k)


# --------------------------------------------------------------------------- native kernel


class NativeQuant:
    """ctypes binding of kernels/quant_linear.c."""

    def __init__(self, library: ctypes.CDLL) -> None:
        p, i, i64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
        self._quantize = library.rq_quantize_rows
        self._quantize.argtypes = [p, i, i, i, p, p, p, p, i, p, ctypes.c_float]
        self._linear = library.rq_linear
        self._linear.argtypes = [p, p, p, p, i, i, p, p, p, p, p, i, i, i, i, i, p, p, i, i64, i]
        self._dequantize = library.rq_dequantize
        self._dequantize.argtypes = [p, p, p, p, p, i, i, i, i, i, p, i, p, i, i]
        for fn in (self._quantize, self._linear, self._dequantize):
            fn.restype = ctypes.c_int
        self.vnni = bool(ctypes.c_int.in_dll(library, "rq_vnni").value)
        isa = library.rq_isa
        isa.restype = ctypes.c_char_p
        self.isa = isa().decode()  # the instruction set the dot products were built for

    def linear(self, x: torch.Tensor, parts: list[QuantWeight], bias: torch.Tensor | None,
               out_dtype: torch.dtype = torch.float32, norm: nn.Module | None = None) -> torch.Tensor:
        """[rows, sum of n] = norm(x) [rows, k] @ W^T (+ bias), in fp32 or bf16 (rounded once, from
        the fp32 sum); parts stack along the outputs. norm: an RMSNorm (weight, eps) that the
        kernel applies while it quantizes the rows. (Kept lean: a drafter step makes ~100 calls.)"""
        x = x.contiguous()
        rows, k = x.shape
        widths = {w.k for w in parts}
        if widths != {k}:
            # the kernel steps through the weight with the activations' width: a mismatch would read
            # past the weight's buffer
            raise ValueError(f"activations have {k} values per row, the weight takes {sorted(widths)}")
        if bias is not None and bias.numel() != sum(w.n for w in parts):
            raise ValueError(f"bias has {bias.numel()} values for {sum(w.n for w in parts)} outputs")
        if x.dtype not in (torch.bfloat16, torch.float32):
            x = x.float()
        x_bf16 = x.dtype == torch.bfloat16
        norm_w, eps = None, 0.0
        if norm is not None:
            norm_w, eps = norm.weight, float(norm.eps)
            if norm_w.dtype != x.dtype:
                norm_w = norm_w.detach().to(x.dtype)
        threads = torch.get_num_threads()
        # the quantized activations in one buffer: int8 values, fp32 scales, int32 sums per 16,
        # fp32 scale x sum per 32
        scratch = torch.empty(rows * k * 2, dtype=torch.uint8)
        xq = scratch.data_ptr()
        xs = xq + rows * k
        bsum = xs + rows * k // 8
        xsb = bsum + rows * k // 4
        if self._quantize(x.data_ptr(), int(x_bf16), rows, k, xq, xs, bsum, xsb, threads,
                          None if norm_w is None else norm_w.data_ptr(), eps):
            raise RuntimeError(f"quant kernel rejected k={k}")
        n_total = sum(w.n for w in parts)
        y_bf16 = out_dtype == torch.bfloat16
        y = torch.empty(rows, n_total, dtype=torch.bfloat16 if y_bf16 else torch.float32)
        # each part writes its columns of y (and reads its slice of the bias) at an offset
        y_at, bias_at = y.data_ptr(), None if bias is None else bias.data_ptr()
        for w in parts:
            if self._linear(xq, xs, bsum, xsb, rows, k, *w.kernel_args, bias_at, y_at, int(y_bf16), n_total, threads):
                raise RuntimeError(f"quant kernel rejected a {w.n}x{w.k} kind-{w.kind} weight")
            y_at += w.n * y.element_size()
            if bias_at is not None:
                bias_at += w.n * bias.element_size()
        return y if y.dtype == out_dtype else y.to(out_dtype)

    def dequantize(self, w: QuantWeight, cols: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        count = w.n if cols is None else cols.numel()
        index = None if cols is None else cols.to(torch.int64).contiguous()
        out_bf16 = dtype == torch.bfloat16
        out = torch.empty(count, w.k, dtype=torch.bfloat16 if out_bf16 else torch.float32)
        status = self._dequantize(
            *w.kernel_args[:6], w.kind, w.group, w.n, w.k, None if index is None else index.data_ptr(), count,
            out.data_ptr(), int(out_bf16), torch.get_num_threads(),
        )
        if status == 3:
            raise ValueError(f"row index outside 0..{w.n - 1} for a {w.n}x{w.k} weight")
        if status:
            raise RuntimeError(f"quant dequantize rejected a {w.n}x{w.k} kind-{w.kind} weight (group {w.group})")
        return out if out.dtype == dtype else out.to(dtype)


@functools.cache
def quant_kernel() -> tuple[NativeQuant | None, str]:
    """The compiled kernel, or None and why not (switched off, no compiler...): the torch path
    runs then."""
    loaded = load_kernel(KERNEL_SOURCE, "quant_linear", "RAPIDQA_NATIVE_QUANT")
    return (None if loaded.library is None else NativeQuant(loaded.library)), loaded.reason


def native_quant() -> NativeQuant | None:
    return quant_kernel()[0]


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

    def forward(self, x: torch.Tensor, norm: nn.Module | None = None) -> torch.Tensor:
        """self(norm(x)) when a norm (the model's RMSNorm) is given: the kernel normalises the rows
        as it quantizes them, with no torch ops of its own."""
        out_dtype = self.out_dtype or x.dtype
        kernel = native_quant()
        if kernel is not None and x.device.type == "cpu":
            return kernel.linear(x, self.parts, self.bias, out_dtype, norm)
        if norm is not None:
            x = norm(x)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        # rowwise: fp32 rows that do not depend on the row count, as a verify needs (F.linear's vary)
        return rowwise.linear(x, self.dense(x.dtype), bias).to(out_dtype)


class QuantEmbedding(nn.Module):
    """Token embeddings kept quantized; looked-up rows are dequantized to the model's dtype."""

    def __init__(self, weight: QuantWeight, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight_q, self.dtype = weight, dtype

    @property
    def nbytes(self) -> int:
        return self.weight_q.nbytes

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        flat = tokens.reshape(-1)
        outside = (flat < 0) | (flat >= self.weight_q.n)
        if outside.any():
            bad = flat[outside][0]
            raise ValueError(f"token id {int(bad)} is outside the vocabulary (0..{self.weight_q.n - 1})")
        return dequantize(self.weight_q, self.dtype, flat).view(*tokens.shape, -1)


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
                tensors.update({f"{name}.{i}.{field}": t for field, t in w.tensors.items()})
        return tensors, layout

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], layout: dict[str, list[dict[str, int]]],
                     tied_lm_head: bool) -> QuantizedState:
        def weight(name: str, m: dict[str, int]) -> QuantWeight:
            t = {field: tensors.get(f"{name}.{field}") for field in _FIELDS}
            return QuantWeight(m["kind"], m["group"], m["n"], m["k"], t["q"], t["d"], t["sub"], t["dmin"], t["msub"],
                               m["per"])

        linears = {name: [weight(f"{name}.{i}", m) for i, m in enumerate(parts)] for name, parts in layout.items()}
        dense = {k: v for k, v in tensors.items() if not k.endswith(tuple(f".{field}" for field in _FIELDS))}
        return cls(linears, dense, tied_lm_head)
