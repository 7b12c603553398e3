"""A verify block's rows equal one-row decode steps, bit for bit, at the real 1.5B's widths.

eta = 0 exactness rests on it: a speculative method accepts a draft by comparing the target's
verify logits with what a decode step (LC) would have produced. torch's CPU elementwise kernels
split a large tensor across threads at offsets that depend on its element count and the thread
count; the elements before a split take a scalar path, whose exp/cos round differently from the
vectorized one (in fp32 a few percent of inputs). Row counts and thread counts that put a split
inside a row (e.g. 8 or 10 rows of 8960 on 3+ threads) then change some rows' values. Every verify
size gamma + 1 in 2..17 runs here under 3, 4 and 8 threads, for the dense and the quantized engine.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from decoding import kv_quant, loading, quant
from decoding import transformer as transformer_module
from decoding.attention import native_attention, torch_attention_all
from decoding.loading import quantize_transformer, transformer_from_hf_model
from decoding.transformer import Transformer

PROMPT = 24
MAX_GAMMA = 16  # the largest gamma the settings allow: verify blocks of up to 17 rows
THREADS = (3, 4, 8)


def real_width_model(dtype: torch.dtype) -> Transformer:
    """One layer of Qwen2.5-1.5B's shape (hidden 1536, intermediate 8960, 12 q / 2 kv heads of 128),
    random weights, a small vocabulary (the head's rows are as independent at 151936 columns)."""
    config = Qwen2Config(vocab_size=1024, hidden_size=1536, intermediate_size=8960, num_hidden_layers=1,
                         num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=4096,
                         rope_theta=1000000.0, tie_word_embeddings=False)
    torch.manual_seed(0)
    hf = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.mul_(4.0)  # wider activations: more of SiLU's and RoPE's inputs away from zero
    return transformer_from_hf_model(hf, dtype)


@pytest.fixture(scope="module")
def fp32_model() -> Transformer:
    return real_width_model(torch.float32)


@pytest.fixture
def restore_threads() -> Iterator[None]:
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


class Recorder:
    """Every forward's logits, and each layer's MLP activation (the down projection's input: the
    quantized kernel rounds its input to 8 bits, which can hide a last-bit change in the logits)."""

    def __init__(self, model: Transformer) -> None:
        self.activations: list[torch.Tensor] = []
        self.hooks = [layer.down.register_forward_pre_hook(self.record) for layer in model.layers]

    def record(self, module: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        self.activations.append(inputs[0].clone())

    def take(self) -> list[torch.Tensor]:
        taken, self.activations = self.activations, []
        return taken


def decode_vs_verify(model: Transformer, threads: int, sizes: Sequence[int] = range(2, MAX_GAMMA + 2),
                     ) -> list[tuple[str, int, int]]:
    """(what, block rows, row) for each verify row of each block size whose logits or MLP activation
    differ from the decode step's."""
    torch.set_num_threads(threads)
    tokens = torch.randint(0, model.args.vocab_size, (PROMPT + MAX_GAMMA + 1,),
                           generator=torch.Generator().manual_seed(threads))
    cache = model.new_cache(PROMPT + MAX_GAMMA + 1)
    model.prefill(tokens[:PROMPT], cache)
    recorder = Recorder(model)
    steps, step_acts = [], []
    for i in range(PROMPT, PROMPT + MAX_GAMMA + 1):
        steps.append(model.forward(tokens[i : i + 1], cache))
        step_acts.append([a[0] for a in recorder.take()])  # row 0: a padded step's second row is a copy
    differ = []
    for rows in sizes:
        cache.crop(PROMPT)
        block = model.forward(tokens[PROMPT : PROMPT + rows], cache, all_logits=True)
        acts = recorder.take()
        for i in range(rows):
            if not torch.equal(block[i], steps[i]):
                differ.append(("logits", rows, i))
            if any(not torch.equal(a[i], s) for a, s in zip(acts, step_acts[i], strict=True)):
                differ.append(("activation", rows, i))
    for hook in recorder.hooks:
        hook.remove()
    return differ


@pytest.mark.parametrize("kv", ["kv-own", "kv8"])
@pytest.mark.parametrize("attention", ["native", "torch"])
@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("engine", ["dense-bf16", "dense-fp32", "quant-bf16", "quant-fp32"])
def test_verify_rows_equal_decode_steps(fp32_model: Transformer, engine: str, threads: int, attention: str, kv: str,
                                        restore_threads: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """kv8: the cache holds the 8-bit form (decoding/kv_quant.py), whose rows are quantized per token."""
    if attention == "torch":  # the path without a C compiler (and on GPUs)
        monkeypatch.setattr(transformer_module, "attention_for", lambda device: torch_attention_all)
    else:
        assert native_attention() is not None
    kind, dtype = engine.split("-")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    if kind == "quant":
        model = quantize_transformer(fp32_model, dtype=dtype)
        assert model.min_rows == 1  # the C kernel runs: the production path
    else:
        model = fp32_model if dtype == torch.float32 else real_width_model(dtype)
    if kv == "kv8":
        monkeypatch.setattr(model, "kv_dtype", kv_quant.STORAGE)  # undone after: fp32_model is shared
        assert model.new_cache(1).quantized
    assert decode_vs_verify(model, threads) == []


def test_dequantizing_fallback_verify_rows_equal_decode_steps(
    fp32_model: Transformer, restore_threads: None, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without the C kernel (no compiler), each quantized linear dequantizes and runs a dense GEMM.
    fp32 activations (a CPU without bf16), one thread count: dequantizing every call is slow."""
    monkeypatch.setattr(quant, "native_quant", lambda: None)
    monkeypatch.setattr(loading, "native_quant", lambda: None)
    model = quantize_transformer(fp32_model, dtype=torch.float32)
    assert model.min_rows == 2
    assert decode_vs_verify(model, 4) == []


@pytest.fixture(scope="module")
def real_target(large_model_dir: Path) -> Transformer:
    from decoding.loading import load_model

    return load_model("1.5b", large_model_dir, torch.bfloat16, torch.device("cpu"), quantized=True).model


@pytest.mark.real_models
@pytest.mark.parametrize("kv", ["bf16", "q8"])
@pytest.mark.parametrize("threads", [1, 2, 4, 8])
def test_real_quantized_target_verify_rows_equal_decode_steps(real_target: Transformer, threads: int, kv: str,
                                                              restore_threads: None,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The real 1.5B as the app runs it (quantized, bf16 activations, full vocabulary head, its KV
    cache bf16 or 8-bit): every verify size of gamma 1..16 (8 rows: a size whose SiLU split fell
    inside a row)."""
    monkeypatch.setattr(real_target, "kv_dtype", kv_quant.STORAGE if kv == "q8" else None)
    assert real_target.new_cache(1).quantized == (kv == "q8")
    assert decode_vs_verify(real_target, threads) == []
