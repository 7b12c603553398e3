"""Which engine and kernels a model runs on, in words: for the statistics record, the UI, CLI,
eval rows and the bench JSON, so a slow fallback is never silent.

A minimal version (the keys are fixed): the kernels' own reasons for falling back are reported
where the kernels are built.
"""

from __future__ import annotations

import torch

from decoding.attention import native_attention
from decoding.model import Transformer
from decoding.quant import native_quant


def engine_description(model: Transformer) -> dict[str, str]:
    """engine, linear_kernel, attention_kernel, threads, warning ("" when nothing runs slow)."""
    dtype = str(model.dtype).removeprefix("torch.")
    device = model.device.type
    warnings: list[str] = []
    if model.quantized:
        engine = f"quantized weights, {dtype} activations, {device}"
        quant = native_quant()
        if quant is None:
            linear = "torch (weights dequantized per call)"
            warnings.append("no native quant kernel (no C compiler?): weights are dequantized per call; install gcc")
        elif quant.vnni:
            linear = "C quant kernel (AVX512-VNNI)"
        else:
            linear = "C quant kernel (portable, no AVX512-VNNI)"
            warnings.append("this CPU lacks AVX512-VNNI: the quant kernel runs its portable loop")
    else:
        engine = f"dense {dtype} weights, {device}"
        linear = "torch"
    if device == "cpu" and native_attention() is not None:
        attention = "C attention kernel"
    else:
        attention = "torch"
        if device == "cpu":
            warnings.append("no native attention kernel (no C compiler?): attention runs in torch")
    return {"engine": engine, "linear_kernel": linear, "attention_kernel": attention,
            "threads": str(torch.get_num_threads()), "warning": "; ".join(warnings)}

