"""Which engine and kernels a loaded model runs on, and why, said once.

Without a C compiler the quantized engine dequantizes every weight on every call, and attention
falls back to torch: both work, many times slower. The description names what runs and, in
"warning", what is slow and what to do, so a user is never left with a slow app and no reason.
The statistics record, the UI, `--json`, eval rows and bench JSON carry the same dict.
"""

from __future__ import annotations

import functools
import sys
from typing import TYPE_CHECKING

import torch

from decoding import kv_quant
from decoding.attention import attention_kernel, native_attention
from decoding.cache import storage_dim
from decoding.native import ISA_VARIABLE, kernel_isa
from decoding.quant import native_quant, quant_kernel

if TYPE_CHECKING:
    from decoding.loaded_model import LoadedModel
    from decoding.transformer import Transformer

FULL_SPEED_ISAS = {"avx512-vnni", "avx512-bf16", "avx2"}  # vector paths; "portable" runs plain C loops


def _problem(kernel_isa_name: str, what: str) -> str:
    """What is slow about a kernel built for kernel_isa_name, "" when nothing is."""
    forced = kernel_isa()
    if forced != "native":
        return f"{what} built for {kernel_isa_name} because {ISA_VARIABLE}={forced} (unset it for this CPU's own build)"
    if kernel_isa_name not in FULL_SPEED_ISAS:
        return f"{what} runs plain C loops (this CPU has no AVX2 or AVX-512 path)"
    return ""


def _remedy(reason: str) -> str:
    """A kernel's failure reason with what to do about it (a missing compiler's says so already)."""
    if reason.startswith("switched off"):
        return f"{reason}: unset it for the C kernel"
    if "did not compile" in reason or "failed on" in reason:
        return f"{reason}: check the C compiler (CC) installation"
    return reason


def _linear(loaded: LoadedModel) -> tuple[str, str]:
    if loaded.weights != "quantized":
        return f"torch {str(loaded.model.dtype).removeprefix('torch.')} matmul (dense weights)", ""
    kernel = native_quant()
    if kernel is not None:
        return f"C {kernel.isa}", _problem(kernel.isa, "the quantized linear kernel")
    reason = quant_kernel()[1] or "the C kernel is not loaded"
    problem = f"every quantized weight is dequantized on every call ({_remedy(reason)})"
    return f"torch dequantize-per-call ({reason})", problem


def _attention(loaded: LoadedModel) -> tuple[str, str]:
    if loaded.model.device.type != "cpu":
        return f"torch sdpa ({loaded.model.device.type})", ""
    kernel = native_attention()
    if kernel is not None:
        if kernel.takes(*_probe(loaded.model)):
            return f"C {kernel.isa}", _problem(kernel.isa, "the attention kernel")
        model = loaded.model
        reason = f"the C kernel does not read {kv_form(model.kv_dtype)} K/V of head_dim {model.args.head_dim}"
        remedy = "; --kv-dtype bf16 keeps the C kernel" if model.kv_dtype == kv_quant.STORAGE else ""
        return f"torch sdpa ({reason})", f"attention runs on torch, slower over long contexts ({reason}{remedy})"
    reason = attention_kernel()[1] or "the C kernel is not loaded"
    return f"torch sdpa ({reason})", f"attention runs on torch, slower over long contexts ({_remedy(reason)})"


def kv_form(dtype: torch.dtype) -> str:
    """A cache dtype as --kv-dtype names it: "q8" for the 8-bit form, else the float dtype (bf16, fp32...)."""
    if dtype == kv_quant.STORAGE:
        return "q8"
    return {torch.bfloat16: "bf16", torch.float32: "fp32", torch.float16: "fp16"}.get(dtype, str(dtype))


def _probe(model: Transformer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One query row and one key slot shaped as the model's passes hand them to attention (its KV form)."""
    a = model.args
    q = torch.empty(1, a.n_heads, a.head_dim, dtype=model.dtype)
    kv = torch.empty(a.n_kv_heads, 1, storage_dim(a.head_dim, model.kv_dtype), dtype=model.kv_dtype)
    return q, kv, kv


def engine_description(model: LoadedModel) -> dict[str, str]:
    """JSON-ready: "engine" (quantized / dense), "linear_kernel", "attention_kernel", "kv_cache" (the
    KV form, kv_form), "threads" and "warning" ("" when everything runs at full speed, else one
    sentence: what is slow, what to do)."""
    linear, linear_problem = _linear(model)
    attention, attention_problem = _attention(model)
    problems = [p for p in (linear_problem, attention_problem) if p]
    warning = f"Slow engine: {'; '.join(problems)}." if problems else ""
    return {"engine": "quantized" if model.weights == "quantized" else "dense", "linear_kernel": linear,
            "attention_kernel": attention, "kv_cache": kv_form(model.model.kv_dtype),
            "threads": str(torch.get_num_threads()), "warning": warning}


def warn_once(description: dict[str, str]) -> None:
    """Print the description's warning on stderr, once per process and message."""
    if description["warning"]:
        _print_once(description["warning"])


@functools.cache
def _print_once(message: str) -> None:
    print(f"rapidqa: {message}", file=sys.stderr, flush=True)
