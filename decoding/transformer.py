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
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from decoding import rowwise
from decoding.attention import AttentionFn, attention_for
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

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache, layer: int,
        attention: AttentionFn, n_queries: int,
    ) -> torch.Tensor:
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
        keys, values = cache.write(layer, k.transpose(0, 1), v.transpose(0, 1))
        attended = attention(q, keys, values, n_queries)
        if n_queries < t:  # padding rows (see the module docstring) copy the last real row
            attended = torch.cat([attended, attended[-1:].expand(t - n_queries, -1)])
        x = x + apply_linear(self.o_proj, attended)
        return x + apply_linear(self.down, swiglu(norm_linear(self.mlp_norm, self.gate_up, x)))


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

    @property
    def dtype(self) -> torch.dtype:
        return self.norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.norm.weight.device

    @property
    def quantized(self) -> bool:
        return isinstance(self.lm_head, QuantLinear)

    def new_cache(self, capacity: int) -> KVCache:
        a = self.args
        return KVCache(a.n_layers, a.n_kv_heads, a.head_dim, capacity, self.dtype, self.device)

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
        n = tokens.shape[0]
        if n == 0:
            raise ValueError("forward needs at least one token")
        # Dense models run two rows minimum: see the module docstring (one-row GEMMs round differently).
        pad = n < self.min_rows
        rows = tokens.repeat(2) if pad else tokens
        start = cache.next_position
        positions = torch.arange(start, start + n, device=self.device)
        if pad:
            positions = positions.repeat(2)
        cache.reserve(rows.shape[0])
        cos, sin = self._rope(positions)
        x = self.embed(rows)
        attention = attention_for(self.device)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, cache, i, attention, n)
        cache.advance(n)
        head = head or self.lm_head
        if all_logits:
            return norm_linear(self.norm, head, x).float()[:n]
        # lm_head on min_rows rows for the same reason; row n-1 is the real last token (a padded
        # decode's second row is the duplicate, which also attends to its own copy).
        lo = max(n - self.min_rows, 0)
        return norm_linear(self.norm, head, x[lo : lo + self.min_rows]).float()[n - 1 - lo]

    @torch.inference_mode()
    def prefill(
        self, tokens: torch.Tensor, cache: KVCache, progress: Callable[[int, int], None] | None = None
    ) -> torch.Tensor:
        """Feed a prompt in fixed-size chunks; returns the logits after its last token.

        progress, when given, is called with (tokens done, tokens total) after each chunk.
        """
        cache.reserve(tokens.shape[0] + 1)
        logits = None
        for begin in range(0, tokens.shape[0], PREFILL_CHUNK):
            logits = self.forward(tokens[begin : begin + PREFILL_CHUNK], cache)
            if progress is not None:
                progress(min(begin + PREFILL_CHUNK, tokens.shape[0]), tokens.shape[0])
        assert logits is not None
        return logits
