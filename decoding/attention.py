"""Attention of new query tokens over a KV cache: a fused C kernel on the CPU, torch elsewhere.

Both take q [T, H, D] and the cache's valid K/V [H_kv, S, D] (the last T slots being the new
tokens, causally masked) and return [n, H * D] for the first n queries. K/V may be 8-bit
(decoding/kv_quant.py: uint8 [H_kv, S, row_bytes(D)], D taken from q): the C kernel reads that form
with integer dot products, the torch path dequantizes it. A batched pass hands
over several sessions' rows at once (`Attend` items): each session's K/V may come in segments,
a read-only document prefix shared by the sessions that read it, then the session's own slots.
The C kernel takes every session on one shared prefix in one call and reads each of the prefix's
blocks once for all their rows; the torch path joins each session's segments.

The C kernel (kernels/attention.c) is compiled once per machine with the system's C compiler
and loaded with ctypes (decoding/native.py); without a compiler, on a GPU, or with
RAPIDQA_NATIVE_ATTENTION=0, the torch path runs instead (decoding/engine_info.py says so).
The kernel takes prefill chunks too, a few query tokens per call: it
measured faster than torch's SDPA path (which repeats K/V per query head) for chunks of every size
and depth tried (README, `python -m bench.prefill_depth`).
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from decoding import kv_quant, rowwise
from decoding.cache import KV_BLOCK, Segments
from decoding.native import build_library, kernel_flags, load_kernel

SMALL_T = 32  # up to this many new tokens, the torch path uses the grouped matmul, beyond it SDPA
KERNEL_SOURCE = Path(__file__).with_name("kernels") / "attention.c"
KERNEL_HEAD_DIMS = (64, 128, 256)



@dataclass(frozen=True)
class Attend:
    """One session's part of a batched pass: its new query rows over its cache's valid K/V."""

    q: torch.Tensor  # [T, H, D]
    segments: Segments  # the keys in slot order; the last T slots are the new tokens (causal)
    n_queries: int  # rows returned: the first n_queries of q (the rest pad a dense model's pass)


# attention([Attend, ...]) -> one [n_queries, H * D] per item, in order
AttentionFn = Callable[[Sequence[Attend]], list[torch.Tensor]]


def joined(segments: Segments) -> tuple[torch.Tensor, torch.Tensor]:
    """The segments' K/V as one [H_kv, S, D] pair (copied when there are several)."""
    if len(segments) == 1:
        return segments[0]
    return torch.cat([k for k, _ in segments], dim=1), torch.cat([v for _, v in segments], dim=1)


def torch_attention_all(items: Sequence[Attend]) -> list[torch.Tensor]:
    """The torch path of a batched pass: each session on its own, over its segments joined (a GPU
    would run it; on a CPU it is the no-compiler fallback)."""
    return [torch_attention(item.q, *joined(item.segments), item.n_queries) for item in items]


def torch_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_queries: int) -> torch.Tensor:
    """Reference path, any device: every query row is computed, the first n_queries returned.
    8-bit K/V (decoding/kv_quant.py) is read as the values it stands for, in q's dtype."""
    t, n_heads, head_dim = q.shape
    if kv_quant.is_quantized(k):
        k, v = kv_quant.dequantize(k, head_dim, q.dtype), kv_quant.dequantize(v, head_dim, q.dtype)
    n_kv, s, _ = k.shape
    group = n_heads // n_kv
    if t > SMALL_T:
        # Prefill chunks: a fused SDPA kernel. Repeating K/V once per chunk measured faster here
        # than enable_gqa (0.40 s vs 0.64 s for 1K queries over 8K keys), and costs little memory.
        mask = torch.ones(t, s, dtype=torch.bool, device=q.device).tril(s - t)
        k, v = k.repeat_interleave(group, dim=0), v.repeat_interleave(group, dim=0)
        out = F.scaled_dot_product_attention(q.transpose(0, 1).unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0),
                                             attn_mask=mask)
        return out.squeeze(0).transpose(0, 1).reshape(t, n_heads * head_dim)[:n_queries]
    rows = group * t
    grouped = q.view(t, n_kv, group, head_dim).permute(1, 2, 0, 3).reshape(n_kv, rows, head_dim)
    # One 2-D matmul per K/V head, never a batched one: k and v are slices of a larger
    # preallocated cache, and a batched matmul copies such a strided batch whole. K @ q^T rather
    # than q @ K^T: with few query rows the CPU bf16 kernel for a transposed right-hand K is ~40x
    # slower.
    # fp32 on a CPU: rowwise GEMMs, whose query rows do not depend on how many share the call (a
    # verify row must equal the decode step's); torch.mm's fp32 rows do.
    invariant = rowwise.takes(q)
    scores = torch.empty(n_kv, rows, s, dtype=torch.float32, device=q.device)
    for h in range(n_kv):
        if invariant:
            scores[h].copy_(rowwise.linear(grouped[h], k[h]))
        else:
            scores[h].copy_(torch.mm(k[h], grouped[h].t()).t())
    scores.mul_(head_dim**-0.5)
    future = torch.ones(t, t, dtype=torch.bool, device=q.device).triu(1)
    scores.view(n_kv, group, t, s)[..., s - t :].masked_fill_(future, float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    out = torch.empty(n_kv, rows, head_dim, dtype=v.dtype, device=q.device)
    for h in range(n_kv):
        if invariant:
            out[h].copy_(rowwise.linear(probs[h], v[h].t()))
        else:
            torch.mm(probs[h], v[h], out=out[h])
    return out.view(n_kv, group, t, head_dim).permute(2, 0, 1, 3).reshape(t, n_heads * head_dim)[:n_queries]


class _Session(ctypes.Structure):
    """kernels/attention.c's rq_session: one session of a batched call."""

    _fields_ = [
        ("q", ctypes.c_void_p), ("q_stride", ctypes.c_int64), ("tokens", ctypes.c_int64),
        ("first_length", ctypes.c_int64), ("k", ctypes.c_void_p), ("v", ctypes.c_void_p),
        ("head_stride", ctypes.c_int64), ("out", ctypes.c_void_p), ("out_stride", ctypes.c_int64),
    ]


# rq_attend_batch's status codes
BATCH_STATUS = {
    -1: "a head_dim, group or K/V head count it does not take",
    -2: "out of memory",
    -3: f"the shared base is not a whole number of {KV_BLOCK}-key blocks",
    -4: "a session with no query rows, no keys or more than 2^31 keys",
}


# rq_attend's kv_form: the K/V element types it reads (8-bit: decoding/kv_quant.py's form)
KV_FORMS = {torch.float32: 0, torch.bfloat16: 1, kv_quant.STORAGE: 2}


def _kv_form(k: torch.Tensor, v: torch.Tensor) -> int:
    """The kernel's code for K/V's element type (-1: one it does not read); K and V of different
    forms are refused."""
    if k.dtype != v.dtype:
        raise ValueError(f"attention K/V of mixed forms: K {k.dtype}, V {v.dtype} (both 8-bit or neither)")
    return KV_FORMS.get(k.dtype, -1)


def _kv_width(q: torch.Tensor, k: torch.Tensor) -> int:
    """Elements per key the kernel expects for q's head_dim: head_dim, or its 8-bit row's bytes."""
    head_dim = q.shape[2]
    if kv_quant.is_quantized(k):
        return kv_quant.row_bytes(head_dim) if head_dim % kv_quant.GROUP == 0 else -1
    return head_dim


def _kernel_rows(rows: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Query rows [T, H, D] as the kernel reads them: bf16 or fp32, each token's heads contiguous."""
    if rows.dtype not in (torch.bfloat16, torch.float32):
        rows = rows.float()
    if rows.stride(2) != 1 or rows.stride(1) != head_dim:
        rows = rows.contiguous()
    return rows


class NativeAttention:
    """ctypes binding of kernels/attention.c; falls back to torch for shapes it does not take."""

    def __init__(self, library: ctypes.CDLL) -> None:
        self._attend_fn = library.rq_attend
        self._attend_fn.restype = ctypes.c_int
        self._attend_fn.argtypes = [
            ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int,
            ctypes.c_int64, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int64,
            ctypes.c_float, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_int,
        ]
        # The kernel's own constants, so the scratch size and call splitting always match it.
        self.block = ctypes.c_int.in_dll(library, "rq_block").value  # keys per work item
        self.max_rows = ctypes.c_int.in_dll(library, "rq_max_rows").value  # query rows per K/V head per call
        isa = library.rq_isa
        isa.restype = ctypes.c_char_p
        self.isa = isa().decode()  # the instruction set the dot products were built for
        if self.block != KV_BLOCK:
            raise RuntimeError(f"attention kernel block {self.block} != the cache's segment alignment {KV_BLOCK}")
        self._batch_fn = library.rq_attend_batch
        self._batch_fn.restype = ctypes.c_int
        self._batch_fn.argtypes = [
            ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.POINTER(_Session), ctypes.c_int,
            ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_float,
            ctypes.c_int,
        ]

    def attend_all(self, items: Sequence[Attend]) -> list[torch.Tensor]:
        """A batched pass's attention, each item bit-identical to the item alone over joined K/V.

        Items on the same shared base (their first of two segments: same K/V tensors and length)
        go in one kernel call, which reads each of the base's blocks once for all their rows;
        items with one segment take the single-cache path."""
        results: list[torch.Tensor | None] = [None] * len(items)
        on_base: dict[tuple[object, ...], list[int]] = {}
        for i, item in enumerate(items):
            if len(item.segments) == 1:
                results[i] = self(item.q, *item.segments[0], item.n_queries)
            elif len(item.segments) != 2:
                raise ValueError(f"attention item {i}: {len(item.segments)} K/V segments, expected 1 or 2 "
                                 "(a cache's own slots, after an optional shared base)")
            elif item.segments[0][0].dtype != item.segments[1][0].dtype:
                raise ValueError(f"attention item {i}: own K/V of {item.segments[1][0].dtype} after a shared base "
                                 f"of {item.segments[0][0].dtype} (one form per session)")
            elif not all(self.takes(item.q, k, v) for k, v in item.segments):
                results[i] = torch_attention(item.q, *joined(item.segments), item.n_queries)
            else:
                on_base.setdefault(_base_key(item), []).append(i)
        for indices in on_base.values():
            for i, out in zip(indices, self._attend_shared([items[i] for i in indices]), strict=True):
                results[i] = out
        return results  # type: ignore[return-value]

    def takes(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
        """Whether the kernel computes this call (else torch does). K and V of different forms
        (8-bit and not) raise: neither path reads them. head_dim is q's (an 8-bit key's last
        dimension is its row's bytes)."""
        _kv_form(k, v)
        n_kv, _, width = k.shape
        if width != _kv_width(q, k):
            raise ValueError(f"attention q {tuple(q.shape)} does not fit K/V heads {tuple(k.shape)} {k.dtype}"
                             + (" (8-bit rows of another head_dim)" if kv_quant.is_quantized(k) else ""))
        return (
            k.device.type == "cpu" and k.dtype in KV_FORMS and q.shape[2] in KERNEL_HEAD_DIMS
            and k.stride(2) == 1 and k.stride(1) == width and v.stride() == k.stride()
            and q.shape[1] // n_kv <= self.max_rows
        )

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_queries: int) -> torch.Tensor:
        if not self.takes(q, k, v):
            return torch_attention(q, k, v, n_queries)
        # A row's result does not depend on the call it is in, so splitting is exact.
        step = self.max_rows // (q.shape[1] // k.shape[0])
        pieces = [self._attend(q, k, v, first, min(first + step, n_queries)) for first in range(0, n_queries, step)]
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    def _attend_shared(self, items: Sequence[Attend]) -> list[torch.Tensor]:
        """Items whose first segment is one shared base, in one kernel call (see attend_all)."""
        (shared_k, shared_v), _ = items[0].segments
        n_kv, n_shared, width = shared_k.shape
        head_dim = items[0].q.shape[2]
        sessions = (_Session * len(items))()
        kept = []  # every tensor the kernel reads or writes, alive until it returns
        outs = []
        for i, item in enumerate(items):
            own_k, own_v = item.segments[1]
            t, n_heads, q_dim = item.q.shape
            keys = n_shared + own_k.shape[1]
            if own_k.shape[0] != n_kv or own_k.shape[2] != width or own_k.dtype != shared_k.dtype:
                raise ValueError(f"attention item {i}: own K/V {tuple(own_k.shape)} {own_k.dtype} do not continue "
                                 f"the shared base's {tuple(shared_k.shape)} {shared_k.dtype}")
            fits = q_dim == head_dim and _kv_width(item.q, own_k) == width
            if not fits or n_heads % n_kv or n_heads != items[0].q.shape[1]:
                raise ValueError(f"attention item {i}: q {tuple(item.q.shape)} does not fit K/V heads "
                                 f"{n_kv} x {width} {shared_k.dtype} (or the batch's other queries)")
            if not 1 <= item.n_queries <= t <= keys:
                raise ValueError(f"attention item {i}: {item.n_queries} of {t} query rows over {keys} keys")
            rows = _kernel_rows(item.q[: item.n_queries], head_dim)
            out = torch.empty(item.n_queries, n_heads * head_dim, dtype=rows.dtype)
            sessions[i] = _Session(rows.data_ptr(), rows.stride(0), item.n_queries, keys - t + 1, own_k.data_ptr(),
                                   own_v.data_ptr(), own_k.stride(0), out.data_ptr(), out.stride(0))
            kept.append(rows)
            outs.append(out)
        q_dtype, group = kept[0].dtype, items[0].q.shape[1] // n_kv
        status = self._batch_fn(
            shared_k.data_ptr(), shared_v.data_ptr(), shared_k.stride(0), n_shared, sessions, len(items),
            int(q_dtype == torch.bfloat16), _kv_form(shared_k, shared_v), int(q_dtype == torch.bfloat16),
            group, n_kv, head_dim, head_dim**-0.5, torch.get_num_threads(),
        )
        if status != 0:
            reason = BATCH_STATUS.get(status, "an unknown status")
            raise RuntimeError(f"attention kernel rejected a batch of {len(items)} sessions over a shared base of "
                               f"{n_shared} keys (head_dim {head_dim}, group {group}): {reason} ({status})")
        return [out if out.dtype == item.q.dtype else out.to(item.q.dtype)
                for out, item in zip(outs, items, strict=True)]

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, first: int, stop: int) -> torch.Tensor:
        t, n_heads, head_dim = q.shape  # head_dim is q's: an 8-bit key's last dimension is its bytes
        n_kv, s, _ = k.shape
        group, n = n_heads // n_kv, stop - first
        # The kernel reads q [T, H, D] and writes [n, H * D] as they are (bf16 or fp32); query
        # token i sees the keys up to its own slot s - t + i.
        rows = _kernel_rows(q[first:stop], head_dim)
        keys = s - t + stop  # later slots are masked for every row of this call
        scratch = torch.empty(n_kv * -(-keys // self.block) * group * n * (head_dim + 2), dtype=torch.float32)
        out = torch.empty(n, n_heads * head_dim, dtype=rows.dtype)
        status = self._attend_fn(
            rows.data_ptr(), int(rows.dtype == torch.bfloat16), rows.stride(0), k.data_ptr(), v.data_ptr(),
            _kv_form(k, v), k.stride(0), s - t + first + 1, n, group, n_kv, head_dim, keys,
            head_dim**-0.5, scratch.data_ptr(), out.data_ptr(), int(out.dtype == torch.bfloat16), out.stride(0),
            torch.get_num_threads(),
        )
        if status != 0:
            raise RuntimeError(f"attention kernel rejected rows={group * n}, head_dim={head_dim} ({status})")
        return out if out.dtype == q.dtype else out.to(q.dtype)


def _base_key(item: Attend) -> tuple[object, ...]:
    """What items must share to go in one batched call: the base's K/V (same storage and length)
    and the query dtype (one per call)."""
    (k, v), _ = item.segments
    return k.data_ptr(), v.data_ptr(), k.shape[1], k.stride(0), v.stride(0), k.dtype, item.q.dtype


def build_kernel(cache_dir: Path, isa: str = "native") -> Path:
    """Compile attention.c into cache_dir (once per source, flags and CPU); returns the library."""
    return build_library(KERNEL_SOURCE, kernel_flags(isa), cache_dir, "attention")


@functools.cache
def attention_kernel() -> tuple[NativeAttention | None, str]:
    """The compiled kernel, or None and why not (switched off, no compiler...): torch runs then."""
    loaded = load_kernel(KERNEL_SOURCE, "attention", "RAPIDQA_NATIVE_ATTENTION")
    return (None if loaded.library is None else NativeAttention(loaded.library)), loaded.reason


def native_attention() -> NativeAttention | None:
    return attention_kernel()[0]


def attention_for(device: torch.device) -> AttentionFn:
    """The attention a model on `device` uses: the C kernel on a CPU when available."""
    if device.type == "cpu":
        kernel = native_attention()
        if kernel is not None:
            return kernel.attend_all
    return torch_attention_all
