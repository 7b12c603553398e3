"""A llama-family decoder (Llama, Qwen2, Mistral) with explicit positions and our own KV cache.

Why not transformers' forward: with several query tokens it builds a full mask and repeats K/V
heads, so verifying 5 drafts at 16K cost ~3x a decode step here. This module keeps the cache
preallocated and hands the new tokens' attention to decoding.attention (a fused C kernel on the
CPU); decoding.loading keeps linear weights prepacked for oneDNN.

Weights are either dense (bf16/fp32, prepacked for oneDNN on the CPU) or quantized
(decoding.quant: the GGUF's own 4/8-bit values, a C kernel with integer dot products).

Exactness: CPU bf16 GEMMs give row results that do not depend on the row count once there are
at least two rows, but the one-row path uses a different kernel. A dense model therefore runs at
least two rows per forward (a decode step duplicates its token; attention is computed for the
real row only and copied), which makes a decode step and a verify pass produce bit-identical
logits for the same token - the attention kernel's rows are independent of the call in the same
way. The quantized kernel's rows never depend on the row count, so a quantized model runs a
decode step as one row (min_rows = 1).

The torch ops between the GEMMs must be row-invariant too, at any thread count: fp32 linears run
through decoding.rowwise (oneDNN) rather than F.linear, and SiLU runs one row per call (swiglu).
RMSNorm's reduction, RoPE's cos/sin, residual adds and the embedding lookup give a row the same
bits in any block (tests/test_row_invariance.py checks decode == verify at the 1.5B's widths).

The same property lets one pass serve several sessions (forward_many): their rows go through each
linear layer together, reading the weights once, and each session attends over its own cache, so
every session gets the logits it would get alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from decoding import kv_quant, rowwise
from decoding.attention import Attend, AttentionFn, attention_for
from decoding.cache import KVCache
from decoding.quant import QuantLinear

SUPPORTED_ARCHITECTURES = ("qwen2", "llama", "mistral")
PREFILL_CHUNK = 1024  # tokens per prefill pass; bounds activation memory on long prompts


@dataclass(frozen=True)
class ModelArgs:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate_size: int
    norm_eps: float
    rope_theta: float
    qkv_bias: bool
    tie_embeddings: bool
    max_positions: int

    @classmethod
    def from_hf_config(cls, config: dict) -> ModelArgs:
        arch = config.get("model_type", "")
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"model type {arch!r} is not supported by the decoding engine "
                f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
            )
        if config.get("rope_scaling") not in (None, {}) and config["rope_scaling"].get("rope_type") not in (
            None, "default",
        ):
            raise ValueError(f"rope scaling {config['rope_scaling']} is not supported")
        n_heads = config["num_attention_heads"]
        max_positions = config.get("max_position_embeddings", 32768)
        window = sliding_window(config)
        if window is not None and window < max_positions:
            # This forward attends to every cached key; such a model is only right up to its window,
            # so it reads no more than that (longer prompts are refused with the token counts).
            max_positions = window
        rope_theta = config.get("rope_theta") or (config.get("rope_parameters") or {}).get("rope_theta", 10000.0)
        return cls(
            vocab_size=config["vocab_size"],
            dim=config["hidden_size"],
            n_layers=config["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=config.get("num_key_value_heads") or n_heads,
            head_dim=config.get("head_dim") or config["hidden_size"] // n_heads,
            intermediate_size=config["intermediate_size"],
            norm_eps=config.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            qkv_bias=arch == "qwen2" or bool(config.get("attention_bias", False)),
            tie_embeddings=bool(config.get("tie_word_embeddings", False)),
            max_positions=max_positions,
        )


def sliding_window(config: dict) -> int | None:
    """The attention window the model was trained with, if its layers use one.

    Mistral-style configs apply `sliding_window` whenever it is set; Qwen2 configs carry a value but
    use it only with `use_sliding_window: true`.
    """
    window = config.get("sliding_window")
    if window is None:
        return None
    used = config.get("use_sliding_window", config.get("model_type") != "qwen2")
    return int(window) if used else None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 like the reference implementations, so logits match theirs.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def norm_linear(norm: RMSNorm, linear: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """linear(norm(x)); a quantized linear applies the norm inside its kernel instead."""
    if isinstance(linear, QuantLinear):
        return linear(x, norm)
    return apply_linear(linear, norm(x))


def apply_linear(linear: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """linear(x); a plain nn.Linear runs through decoding.rowwise, whose fp32 rows do not depend on
    the row count (F.linear's fp32 CPU GEMM rounds a verify row differently from a decode step)."""
    if type(linear) is nn.Linear:
        return rowwise.linear(x, linear.weight, linear.bias)
    return linear(x)


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for each row of [rows, 2 * intermediate], one SiLU call per row.

    torch's CPU SiLU splits a large tensor across threads at element offsets set by its size and the
    thread count, and the elements before each split take a scalar exp that rounds differently from
    the vectorized one. On the whole block, a verify row could then differ from the same row in a
    one-row decode step. A one-row call is the same computation for every row, whatever the row
    count or thread count. gate_up is the linear's fresh output, so SiLU runs in place.
    """
    gate, up = gate_up.chunk(2, dim=-1)
    for row in gate:
        F.silu(row, inplace=True)
    return gate * up


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Block(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        q_out = args.n_heads * args.head_dim
        kv_out = args.n_kv_heads * args.head_dim
        self.qkv = nn.Linear(args.dim, q_out + 2 * kv_out, bias=args.qkv_bias)
        self.o_proj = nn.Linear(q_out, args.dim, bias=False)
        self.gate_up = nn.Linear(args.dim, 2 * args.intermediate_size, bias=False)
        self.down = nn.Linear(args.intermediate_size, args.dim, bias=False)
        self.attn_norm = RMSNorm(args.dim, args.norm_eps)
        self.mlp_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, parts: Sequence[Part], layer: int,
                attention: AttentionFn) -> torch.Tensor:
        """x: every part's rows, one after another; each part writes and attends over its own cache."""
        a = self.args
        t = x.shape[0]
        qkv = norm_linear(self.attn_norm, self.qkv, x)
        q_out, kv_out = a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim
        # q and k rotate together: one set of elementwise ops (the drafter's step is short enough
        # for per-op overhead to show), the same values as rotating each.
        qk = qkv[:, : q_out + kv_out].view(t, a.n_heads + a.n_kv_heads, a.head_dim)
        qk = qk * cos + rotate_half(qk) * sin
        q, k = qk[:, : a.n_heads], qk[:, a.n_heads :]
        v = qkv[:, q_out + kv_out :].view(t, a.n_kv_heads, a.head_dim)
        items = []
        for part in parts:
            rows = slice(part.first, part.first + part.rows)
            segments = part.cache.write(layer, k[rows].transpose(0, 1), v[rows].transpose(0, 1))
            items.append(Attend(q[rows], segments, part.n_queries))
        pieces = []
        for part, attended in zip(parts, attention(items), strict=True):
            pieces.append(attended)
            if part.n_queries < part.rows:  # padding rows (see the module docstring) copy the last real row
                pieces.append(attended[-1:].expand(part.rows - part.n_queries, -1))
        attended = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
        x = x + apply_linear(self.o_proj, attended)
        return x + apply_linear(self.down, swiglu(norm_linear(self.mlp_norm, self.gate_up, x)))


@dataclass(frozen=True)
class Rows:
    """One session's new tokens in a pass: fed at its cache's next positions."""

    tokens: torch.Tensor  # [T] token ids
    cache: KVCache
    all_logits: bool = False  # [T, V] logits instead of the last token's [V]
    head: nn.Module | None = None  # replaces lm_head (a drafter scoring fewer tokens)
    drafting: bool = False  # a drafter's pass: a scheduler runs them before the target's verify passes


@dataclass(frozen=True)
class Part:
    """Where one session's rows lie in a pass's activations."""

    first: int
    rows: int  # rows in the pass (a dense model's one-token step is padded to two)
    n_queries: int  # real tokens
    cache: KVCache


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.embed = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.lm_head = nn.Linear(args.dim, args.vocab_size, bias=False)
        inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, args.head_dim, 2).float() / args.head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.min_rows = 2  # rows per forward at least (see the module docstring)
        self._kv_dtype: torch.dtype | None = None  # None: the model's dtype

    @property
    def dtype(self) -> torch.dtype:
        return self.norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.norm.weight.device

    @property
    def quantized(self) -> bool:
        return isinstance(self.lm_head, QuantLinear)

    @property
    def kv_dtype(self) -> torch.dtype:
        """What its caches store: the model's dtype, or torch.uint8 for the 8-bit form (decoding/kv_quant.py)."""
        return self._kv_dtype or self.dtype

    @kv_dtype.setter
    def kv_dtype(self, dtype: torch.dtype | None) -> None:
        if dtype is not None and dtype not in (self.dtype, kv_quant.STORAGE):
            raise ValueError(f"a KV cache stores the model's dtype ({self.dtype}) or the 8-bit form "
                             f"({kv_quant.STORAGE}), not {dtype}")
        if dtype == kv_quant.STORAGE:
            kv_quant.row_bytes(self.args.head_dim)  # refuses a head_dim the 8-bit form cannot hold
        self._kv_dtype = dtype

    def new_cache(self, capacity: int) -> KVCache:
        a = self.args
        return KVCache(a.n_layers, a.n_kv_heads, a.head_dim, capacity, self.kv_dtype, self.device)

    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]  # [T, 1, D] broadcasts over heads
        return emb.cos().to(self.dtype), emb.sin().to(self.dtype)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, cache: KVCache, all_logits: bool = False,
                head: nn.Module | None = None) -> torch.Tensor:
        """Run new tokens at the cache's next positions; returns fp32 logits.

        all_logits=False returns the logits after the last token as [V]; True returns [T, V].
        The cache advances by len(tokens). head replaces lm_head (a drafter scoring fewer tokens).
        """
        return self.forward_many([Rows(tokens, cache, all_logits, head)])[0]

    @torch.inference_mode()
    def forward_many(self, batch: Sequence[Rows]) -> list[torch.Tensor]:
        """One pass over several sessions' rows (each with its own cache); their logits, in order.

        Every linear layer reads its weights once for all rows, and a row's result does not depend on
        the other rows in the pass (see the module docstring), so each session gets the logits it
        would get alone. Attention is per session, over that session's cache.
        """
        if any(rows.tokens.shape[0] == 0 for rows in batch):
            raise ValueError("forward needs at least one token")
        # Dense models run two rows minimum: see the module docstring (one-row GEMMs round differently).
        total = sum(rows.tokens.shape[0] for rows in batch)
        pad = total < self.min_rows
        parts, ids, positions, first = [], [], [], 0
        for rows in batch:
            n = rows.tokens.shape[0]
            copies = 2 if pad else 1
            start = rows.cache.next_position
            ids.append(rows.tokens.repeat(copies))
            positions.append(torch.arange(start, start + n, device=self.device).repeat(copies))
            parts.append(Part(first, n * copies, n, rows.cache))
            rows.cache.reserve(n * copies)
            first += n * copies
        cos, sin = self._rope(torch.cat(positions))
        x = self.embed(torch.cat(ids))
        attention = attention_for(self.device)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, parts, i, attention)
        for rows in batch:
            rows.cache.advance(rows.tokens.shape[0])
        return self._logits(x, batch, parts)

    def _logits(self, x: torch.Tensor, batch: Sequence[Rows], parts: Sequence[Part]) -> list[torch.Tensor]:
        """Each session's logits: all its real rows, or its last one.

        A row's logits do not depend on the other rows of the output layer's call once it has
        min_rows rows, so the model's own output layer takes every session's rows in one call, and a
        session's own head (a drafter's) its rows alone; either call is padded to min_rows rows by
        repeating its last row.
        """
        picked = []
        for rows, part in zip(batch, parts, strict=True):
            end = part.first + part.n_queries
            picked.append(x[part.first : end] if rows.all_logits else x[end - 1 : end])
        out: list[torch.Tensor] = [torch.empty(0)] * len(batch)
        shared = [i for i, rows in enumerate(batch) if rows.head is None]
        if shared:
            logits = self._head(self.lm_head, torch.cat([picked[i] for i in shared]))
            at = 0
            for i in shared:
                out[i] = logits[at : at + picked[i].shape[0]]
                at += picked[i].shape[0]
        for i, rows in enumerate(batch):
            if rows.head is not None:
                out[i] = self._head(rows.head, picked[i])
        return [logits if rows.all_logits else logits[0] for rows, logits in zip(batch, out, strict=True)]

    def _head(self, head: nn.Module, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        if n < self.min_rows:
            x = torch.cat([x, x[-1:].expand(self.min_rows - n, -1)])
        return norm_linear(self.norm, head, x).float()[:n]

    @torch.inference_mode()
    def prefill(
        self, tokens: torch.Tensor, cache: KVCache, progress: Callable[[int, int], None] | None = None,
        run: Run | None = None,
    ) -> torch.Tensor:
        """Feed a prompt in fixed-size chunks; returns the logits after its last token.

        progress, when given, is called with (tokens done, tokens total) after each chunk. run: who
        runs each chunk's pass (a scheduler batching it with other sessions' rows); default, at once.
        """
        run = run or run_alone
        cache.reserve(tokens.shape[0] + 1)
        logits = None
        for begin in range(0, tokens.shape[0], PREFILL_CHUNK):
            logits = run(self, Rows(tokens[begin : begin + PREFILL_CHUNK], cache))
            if progress is not None:
                progress(min(begin + PREFILL_CHUNK, tokens.shape[0]), tokens.shape[0])
        assert logits is not None
        return logits


# (model, one session's rows) -> their logits: a pass run at once, or one a scheduler batches with
# other sessions' rows (decoding/scheduler.py); either way the same logits.
Run = Callable[[Transformer, Rows], torch.Tensor]


def run_alone(model: Transformer, rows: Rows) -> torch.Tensor:
    return model.forward_many([rows])[0]
