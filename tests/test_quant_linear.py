"""Quantized weights: exact GGUF unpacking, a row-invariant kernel, and eta = 0 exactness on it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from app.registry import GGUF_FILE
from decoding import quant
from decoding.generate import generate, run_to_end
from decoding.gguf import GGUF_KINDS, Unpacked, from_gguf
from decoding.loaded_model import LoadedModel, Prompt
from decoding.loading import QUANT_FILE, has_quantized_weights, load_model, quantize_transformer
from decoding.prefix_cache import PrefixCache
from decoding.quant import QuantLinear, QuantWeight, native_quant
from decoding.settings import DecodingSettings
from tests.test_decoding_tiny import EXACT_VOCAB, check_drafters_exact, check_lookup_exact, passage_spans_of
from tests.tiny import EXACT_FORM_IDS, EXACT_FORMS, random_prompt, tiny_model

SPECULATIVE = ("sd", "magicdec", "rapid", "rapid-focus", "lookup")
LAYOUTS = [(4, 32), (5, 32), (6, 16), (8, 16), (8, 32)]  # (kind, group): Q4_K; Q5_0; Q6_K; (Q6_K as 8-bit); Q8_0


@pytest.fixture(scope="module")
def kernel() -> quant.NativeQuant:
    built = native_quant()
    assert built is not None, "the quantized kernel did not build: is a C compiler (cc) installed?"
    return built


def random_weight(kind: int, group: int, n: int = 64, k: int = 256, seed: int = 0) -> QuantWeight:
    return quant.quantize(torch.randn(n, k, generator=torch.Generator().manual_seed(seed)), kind, group)


def activations(rows: int, k: int = 256, seed: int = 1, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    return torch.randn(rows, k, generator=torch.Generator().manual_seed(seed)).to(dtype)


# --------------------------------------------------------------------------- layout


@pytest.mark.parametrize(("kind", "group"), LAYOUTS)
def test_pack_round_trips_values(kind: int, group: int) -> None:
    gen = torch.Generator().manual_seed(2)
    n, k = 48, 640  # 20 or 40 groups: the last super-block is partial
    per = 1 if group == 32 and kind != 4 else 256 // group
    supers, groups = -(-k // (group * per)), k // group
    low, high = {4: (0, 16), 5: (-16, 16), 6: (-32, 32), 8: (-128, 128)}[kind]
    values = torch.randint(low, high, (n, k), generator=gen).numpy()

    def top() -> np.ndarray:
        return (torch.rand(n, supers, generator=gen) + 0.5).numpy().astype(np.float16)

    def sub() -> np.ndarray | None:
        return None if per == 1 else torch.randint(-64, 64, (n, groups), generator=gen).numpy().astype(np.int8)

    d, s = top(), sub()
    dmin, msub = (top(), sub()) if kind == 4 else (None, None)
    w = quant.pack(values, d, s, kind, group, per, dmin, msub)
    scale, minimum = Unpacked(values, d, s, group, per, dmin, msub).scales()
    expected = np.repeat(scale, group, axis=1) * values.astype(np.float32)
    if minimum is not None:
        expected = expected - np.repeat(minimum, group, axis=1)
    assert np.array_equal(quant.dequantize_torch(w).numpy(), expected.astype(np.float32))
    # the scales cost what they cost in the GGUF: fp16 per super-block, one byte per group
    scale_bytes = n * (2 * supers + (0 if per == 1 else groups))
    value_bytes = {4: n * k // 2, 5: n * k * 5 // 8, 6: n * k * 3 // 4, 8: n * k}[kind]
    assert w.nbytes == value_bytes + scale_bytes * (2 if kind == 4 else 1)


# Q6_K's values (two-level scales, groups of 16) and Q5_0's (fp16 per 32) in their own bits or in 8
# (as the engine read Q5_0 before kind 5): the same integer sums and float steps, so the same bits.
@pytest.mark.parametrize(("kind", "group", "per", "saving"), [(6, 16, 16, 0.8), (5, 32, 1, 0.7)])
def test_narrow_layouts_give_the_eight_bit_layouts_bits(kernel: quant.NativeQuant, kind: int, group: int, per: int,
                                                        saving: float) -> None:
    gen = torch.Generator().manual_seed(kind)
    top = 2 ** (kind - 1)
    values = torch.randint(-top, top, (64, 512), generator=gen).numpy()
    d = (torch.rand(64, 512 // (group * per), generator=gen) + 0.5).numpy().astype(np.float16)
    sub = None if per == 1 else torch.randint(-64, 64, (64, 512 // group), generator=gen).numpy().astype(np.int8)
    narrow, eight = quant.pack(values, d, sub, kind, group, per), quant.pack(values, d, sub, 8, group, per)
    assert narrow.nbytes < saving * eight.nbytes
    assert torch.equal(quant.dequantize_torch(narrow), quant.dequantize_torch(eight))
    for rows in (1, 6, 20):
        x = activations(rows, k=512, seed=rows)
        assert torch.equal(kernel.linear(x, [narrow], None), kernel.linear(x, [eight], None)), rows


def test_stacked_parts_give_the_separate_parts_bits(kernel: quant.NativeQuant) -> None:
    parts = [random_weight(5, 32, n=32, seed=1), random_weight(5, 32, n=64, seed=2), random_weight(8, 32, seed=3),
             random_weight(4, 32, n=16, seed=4), random_weight(4, 32, n=48, seed=5)]
    joined = quant.stacked(parts)
    assert [(w.kind, w.n) for w in joined] == [(5, 96), (8, 64), (4, 64)]
    x = activations(6)
    assert torch.equal(kernel.linear(x, joined, None), kernel.linear(x, parts, None))
    assert torch.equal(torch.cat([quant.dequantize_torch(w) for w in joined]),
                       torch.cat([quant.dequantize_torch(w) for w in parts]))


def test_pack_refuses_inconsistent_scales() -> None:
    values, d = np.zeros((16, 64), np.int16), np.ones((16, 2), np.float16)
    with pytest.raises(ValueError):
        quant.pack(values, d, np.ones((16, 2), np.int8), 8, 32, 1)  # sub-scales need super-blocks
    with pytest.raises(ValueError):
        quant.pack(values, d, None, 4, 32, 1)  # a 4-bit weight without its mins


@pytest.mark.parametrize(("kind", "group"), LAYOUTS)
def test_native_dequantize_equals_torch(kernel: quant.NativeQuant, kind: int, group: int) -> None:
    w = random_weight(kind, group)
    reference = quant.dequantize_torch(w)
    assert torch.equal(kernel.dequantize(w, None, torch.float32), reference)
    cols = torch.tensor([5, 0, 63, 17, 5])
    assert torch.equal(kernel.dequantize(w, cols, torch.bfloat16), reference[cols].bfloat16())


# --------------------------------------------------------------------------- kernel


@pytest.mark.parametrize(("kind", "group"), LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rows_are_bit_identical_across_row_counts(kernel: quant.NativeQuant, kind: int, group: int,
                                                  dtype: torch.dtype) -> None:
    # What makes a decode step and a verify pass give bit-identical logits.
    parts = [random_weight(kind, group, seed=3), random_weight(4, 32, n=32, seed=4)]
    bias = torch.randn(96, generator=torch.Generator().manual_seed(5))
    x = activations(32, dtype=dtype)
    full = kernel.linear(x, parts, bias)
    for rows in range(1, 33):
        assert torch.equal(kernel.linear(x[:rows], parts, bias), full[:rows]), rows
        assert torch.equal(kernel.linear(x[rows - 1 : rows], parts, bias)[0], full[rows - 1]), rows
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(kernel.linear(x, parts, bias), full)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_norm_in_the_kernel(kernel: quant.NativeQuant, dtype: torch.dtype) -> None:
    from decoding.transformer import RMSNorm

    norm = RMSNorm(256, 1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(256, generator=torch.Generator().manual_seed(6)) + 0.5)
    parts = [random_weight(4, 32, seed=3), random_weight(8, 16, n=32, seed=4)]
    x = activations(32, dtype=dtype) * 3
    fused = kernel.linear(x, parts, None, torch.float32, norm)
    for rows in (1, 6, 17):  # row-invariant, like the plain kernel
        assert torch.equal(kernel.linear(x[:rows], parts, None, torch.float32, norm), fused[:rows]), rows
    # the same function as norm then linear (the sum of squares is ordered differently, so a
    # value may round to a neighbouring bf16)
    separate = kernel.linear(norm(x), parts, None)
    torch.testing.assert_close(fused, separate, rtol=0.02, atol=0.02 * separate.abs().max().item())
    assert (fused == separate).float().mean() > 0.5


def reference_linear(x: torch.Tensor, w: QuantWeight) -> torch.Tensor:
    """float64 model of the kernel: int8 activations per 32 values, then exact products."""
    xf = x.double().view(x.shape[0], -1, 32)
    step = xf.abs().amax(-1, keepdim=True) / 127
    xq = torch.where(step > 0, torch.round(xf / torch.where(step > 0, step, 1)), 0).clamp(-127, 127)
    return (xq * step).view(x.shape[0], -1) @ quant.dequantize_torch(w).double().T


@pytest.mark.parametrize("isa", ["avx2", "portable"])
def test_other_builds_give_the_native_builds_bits(kernel: quant.NativeQuant, tmp_path: Path, isa: str) -> None:
    # CPUs without AVX512-VNNI compile the AVX2 or the plain C paths: they must form the same sums
    import ctypes

    from decoding.native import build_library, kernel_flags
    from decoding.transformer import RMSNorm

    if not kernel.vnni:
        pytest.skip("this machine builds a non-VNNI kernel already")
    library = build_library(quant.KERNEL_SOURCE, kernel_flags(isa), tmp_path, isa)
    other = quant.NativeQuant(ctypes.CDLL(str(library)))
    assert other.isa == isa and not other.vnni and kernel.isa == "avx512-vnni"
    for dtype in (torch.bfloat16, torch.float32):
        norm = RMSNorm(256, 1e-6).to(dtype)
        norm.weight.data = torch.randn(256, generator=torch.Generator().manual_seed(9)).to(dtype)
        for kind, group in LAYOUTS:
            w = random_weight(kind, group, n=32, k=256, seed=kind)
            for rows in (1, 6, 9, 17):  # one row, a verify block, a block and a bit, several blocks
                x = activations(rows, seed=rows, dtype=dtype)
                for n in (None, norm):  # activations quantized as they are, or RMS-normalised first
                    assert torch.equal(other.linear(x, [w], None, norm=n), kernel.linear(x, [w], None, norm=n)), (
                        dtype, kind, group, rows, n)
    # extreme values: full-range weights and activations, where an int16 sum would saturate
    for kind, group in LAYOUTS:
        low, high = {4: (0, 16), 5: (-16, 16), 6: (-32, 32), 8: (-128, 128)}[kind]
        for value in (low, high - 1):
            values = np.full((16, 64), value)
            per = 1 if group == 32 and kind != 4 else 256 // group
            groups = 64 // group
            d = np.ones((16, -(-groups // per)), np.float16)
            sub = None if per == 1 else np.ones((16, groups), np.int8)
            mins = (d, sub) if kind == 4 else (None, None)
            w = quant.pack(values, d, sub, kind, group, per, *mins)
            for sign in (1.0, -1.0):
                x = torch.full((2, 64), sign)
                assert torch.equal(other.linear(x, [w], None), kernel.linear(x, [w], None)), (kind, value, sign)
                expected = torch.full((2, 16), sign * 64.0 * (value - (kind == 4)))  # kind 4 subtracts its min 1
                torch.testing.assert_close(other.linear(x, [w], None), expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(("kind", "group"), LAYOUTS)
def test_kernel_matches_float_reference(kernel: quant.NativeQuant, kind: int, group: int) -> None:
    w = random_weight(kind, group, n=128, k=512)
    x = activations(7, k=512, dtype=torch.float32)
    ours = kernel.linear(x, [w], None).double()
    torch.testing.assert_close(ours, reference_linear(x, w), rtol=1e-4, atol=1e-3)
    # and close to the unquantized activations' product (int8 activations cost ~1% here)
    dense = x.double() @ quant.dequantize_torch(w).double().T
    assert (ours - dense).abs().max() < 0.02 * dense.abs().max()


def test_shapes_it_does_not_take_are_refused(kernel: quant.NativeQuant) -> None:
    with pytest.raises(ValueError):
        quant.quantize(torch.randn(40, 64), 4)  # 40 outputs: not a multiple of 16


def test_fallback_without_the_native_kernel(monkeypatch) -> None:
    parts = [random_weight(4, 32), random_weight(6, 16, n=32)]
    bias = torch.randn(96)
    linear = QuantLinear(parts, bias)
    x = activations(5, dtype=torch.float32)
    native = linear(x)
    monkeypatch.setattr(quant, "native_quant", lambda: None)
    monkeypatch.setattr("decoding.loading.native_quant", lambda: None)
    fallback = linear(x)
    dense = torch.cat([quant.dequantize_torch(w) for w in parts])
    torch.testing.assert_close(fallback, F.linear(x, dense, bias))
    torch.testing.assert_close(fallback, native, rtol=0.05, atol=0.05 * native.abs().max().item())
    target, drafter = quantized(tiny_model(1)), quantized(tiny_model(2, noise_from=1, noise=0.01))
    assert target.model.min_rows == 2  # dense GEMMs round a single row differently: decode pads to two
    prompt, rag = random_prompt(100, seed=4), random_prompt(30, seed=5)
    lc = run("lc", target, drafter, prompt, rag, max_new_tokens=16)
    for method in SPECULATIVE:
        assert run(method, target, drafter, prompt, rag, max_new_tokens=16, gamma=3).token_ids == lc.token_ids


# --------------------------------------------------------------------------- tiny models, end to end

KINDS = {"qkv": 8, "gate_up": 5, "down": 6, "embed": 8, "lm_head": 6}  # o_proj: 4-bit (the GGUF files mix them)


def quantized(model: LoadedModel, dtype: torch.dtype = torch.float32,
              kv_dtype: torch.dtype | None = None) -> LoadedModel:
    q = quantize_transformer(model.model, KINDS, dtype)
    q.kv_dtype = kv_dtype
    return LoadedModel(model.name + "-q", None, q, model.tokenizer, model.stop_ids, "quantized")


@pytest.fixture(scope="module")
def pair() -> tuple[LoadedModel, LoadedModel]:
    return quantized(tiny_model(1)), quantized(tiny_model(2, noise_from=1, noise=0.01))


@pytest.fixture(scope="module")
def pair_bf16() -> tuple[LoadedModel, LoadedModel]:
    """bf16 activations and KV cache, as the real engine runs them."""
    return (quantized(tiny_model(1), torch.bfloat16),
            quantized(tiny_model(2, noise_from=1, noise=0.01), torch.bfloat16))


def run(method: str, target: LoadedModel, drafter: LoadedModel, prompt: Prompt, rag: Prompt, **overrides):
    settings = DecodingSettings(method=method, **({"max_new_tokens": 40} | overrides))
    return run_to_end(generate(method, target, drafter, prompt, rag, settings, passage_spans=passage_spans_of(prompt)))


def test_decode_steps_equal_a_verify_pass(pair) -> None:
    model = pair[0].model
    assert model.quantized and model.min_rows == 1
    ids = torch.randint(0, 256, (40,), generator=torch.Generator().manual_seed(9))
    cache = model.new_cache(64)
    model.prefill(ids[:30], cache)
    verify = model.forward(ids[30:], cache, all_logits=True)
    cache.crop(30)
    for i in range(10):
        assert torch.equal(model.forward(ids[30 + i : 31 + i], cache), verify[i]), i


@pytest.fixture(scope="module", params=EXACT_FORMS, ids=EXACT_FORM_IDS)
def small_vocab_pair(request) -> tuple[LoadedModel, LoadedModel]:
    """The exactness suite's inputs (tests/test_decoding_tiny.py), on quantized weights; bf16 with
    8-bit KV is what the app runs on a CPU."""
    dtype, kv_dtype = request.param
    pair = (quantized(tiny_model(1, vocab=EXACT_VOCAB), dtype, kv_dtype),
            quantized(tiny_model(2, noise_from=1, noise=0.01, vocab=EXACT_VOCAB), dtype, kv_dtype))
    assert all(m.model.new_cache(1).quantized == (kv_dtype is not None) for m in pair)  # the form really runs
    return pair


@pytest.mark.parametrize("length", [12, 300, 1100])  # 1100 crosses a prefill chunk boundary
def test_greedy_eta0_equals_lc(small_vocab_pair, length: int) -> None:
    check_drafters_exact(*small_vocab_pair, length)
    check_lookup_exact(small_vocab_pair[0], length)


def test_quantized_speculation_really_drafts(pair) -> None:
    target, drafter = pair
    prompt = random_prompt(300, seed=3)
    out = run("sd", target, drafter, prompt, prompt, gamma=4, max_new_tokens=60)
    assert 0.1 < out.stats.acceptance_rate < 1.0  # both accepts and rejections are exercised


# --------------------------------------------------------------------------- the real embedded models

QUESTION = "Which R function reads files in fixed width format, and what does it need to be told?"


def require_quantized(directory: Path) -> Path:
    assert has_quantized_weights(directory), f"{directory} has no current {QUANT_FILE}: run `make models-test`"
    return directory


@pytest.mark.real_models
def test_unpacking_equals_gguf_dequantize(small_model_dir: Path, large_model_dir: Path) -> None:
    from gguf import GGUFReader
    from gguf.quants import dequantize

    seen: set[str] = set()
    for directory in (small_model_dir, large_model_dir):
        reader = GGUFReader(directory / GGUF_FILE)
        for t in reader.tensors:
            qtype = t.tensor_type.name
            if qtype not in GGUF_KINDS or (qtype, directory) in seen or t.name.startswith(("token", "output")):
                continue
            seen.add((qtype, directory))
            k, n = int(t.shape[0]), int(t.shape[1])
            expected = dequantize(t.data, t.tensor_type).reshape(n, k)
            w = from_gguf(qtype, t.data, n, k)
            assert np.array_equal(quant.dequantize_torch(w).numpy(), expected), (t.name, qtype)
            assert np.array_equal(quant.dequantize(w, torch.float32).numpy(), expected), (t.name, qtype)
    assert {q for q, _ in seen} == set(GGUF_KINDS)  # Q4_K, Q6_K, Q5_0 and Q8_0 all checked


@pytest.mark.real_models
def test_quantized_weights_are_the_dense_caches_values(small_model_dir: Path) -> None:
    """Dequantized, the kernel layout gives the bf16 cache's weights: the names map right."""
    from safetensors import safe_open

    from decoding.loading import load_quantized_state

    state = load_quantized_state(require_quantized(small_model_dir))
    with safe_open(str(small_model_dir / "model.safetensors"), "pt") as dense:
        for layer in (0, 1):
            qkv = torch.cat([quant.dequantize(w, torch.bfloat16) for w in state.linears[f"layers.{layer}.qkv"]])
            expected = torch.cat([dense.get_tensor(f"model.layers.{layer}.self_attn.{name}.weight")
                                  for name in ("q_proj", "k_proj", "v_proj")])
            assert torch.equal(qkv, expected), layer
            down = dense.get_tensor(f"model.layers.{layer}.mlp.down_proj.weight")
            assert torch.equal(quant.dequantize(state.linears[f"layers.{layer}.down"][0], torch.bfloat16), down)


@pytest.mark.real_models
def test_real_pair_every_method_returns_lc_tokens(small_model_dir: Path, large_model_dir: Path,
                                                  tmp_path: Path) -> None:
    from tests.docs import page_text

    target = load_model("1.5b", require_quantized(large_model_dir), torch.bfloat16, torch.device("cpu"), True)
    drafter = load_model("0.5b", require_quantized(small_model_dir), torch.bfloat16, torch.device("cpu"), True)
    assert target.weights == drafter.weights == "quantized" and target.model.min_rows == 1
    ids = target.encode(page_text([14, 15]))
    long_prompt = target.prompt(target.decode(ids[:300]), QUESTION)
    rag_prompt = target.prompt(target.decode(ids[100:250]), QUESTION)
    settings = DecodingSettings(max_new_tokens=24, gamma=5, eta=0.0, magicdec_window=128)
    cache = PrefixCache(tmp_path, {})
    lc = run_to_end(generate("lc", target, drafter, long_prompt, rag_prompt, settings, cache.hooks()))
    assert lc.stats.generated > 5
    rejected = 0
    passage = long_prompt.boundaries[0] + 100  # the focus drafter keeps about what the RAG drafter reads
    for method in SPECULATIVE:
        out = run_to_end(generate(method, target, drafter, long_prompt, rag_prompt, settings, cache.hooks(),
                                  passage_spans=[(passage, passage + 150)]))
        assert out.token_ids == lc.token_ids, method
        assert out.stats.prefix_cached_tokens == len(long_prompt.prefix)
        assert out.stats.drafted > 0 and out.stats.accepted > 0, method
        rejected += out.stats.drafted - out.stats.accepted
    assert rejected > 0


# --------------------------------------------------------------------------- the registry's conversion


def write_tiny_gguf(path: Path, architecture: str) -> dict:
    """A one-layer GGUF with Q5_0/Q8_0 tensors (the formats gguf can write) and its HF config."""
    from gguf import GGMLQuantizationType, GGUFWriter
    from gguf.quants import quantize as gguf_quantize

    dim, hidden, vocab, head_dim = 64, 96, 32, 32
    rng = np.random.default_rng(0)
    writer = GGUFWriter(str(path), arch=architecture)

    def add(name: str, shape: tuple[int, ...], qtype: GGMLQuantizationType) -> None:
        values = rng.standard_normal(shape).astype(np.float32)
        if qtype == GGMLQuantizationType.F32:
            writer.add_tensor(name, values)
        else:
            writer.add_tensor(name, gguf_quantize(values, qtype), raw_dtype=qtype)

    q5, q8, f32 = GGMLQuantizationType.Q5_0, GGMLQuantizationType.Q8_0, GGMLQuantizationType.F32
    add("token_embd.weight", (vocab, dim), q5)
    add("output.weight", (vocab, dim), q8)
    add("output_norm.weight", (dim,), f32)
    for name, shape, qtype in [("attn_q", (dim, dim), q5), ("attn_k", (head_dim, dim), q5),
                               ("attn_v", (head_dim, dim), q8), ("attn_output", (dim, dim), q8),
                               ("ffn_gate", (hidden, dim), q5), ("ffn_up", (hidden, dim), q5),
                               ("ffn_down", (dim, hidden), q8)]:
        add(f"blk.0.{name}.weight", shape, qtype)
    for name, size in [("attn_q.bias", dim), ("attn_k.bias", head_dim), ("attn_v.bias", head_dim),
                       ("attn_norm.weight", dim), ("ffn_norm.weight", dim)]:
        add(f"blk.0.{name}", (size,), f32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"model_type": "qwen2", "vocab_size": vocab, "hidden_size": dim, "intermediate_size": hidden,
            "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1, "rms_norm_eps": 1e-6,
            "rope_theta": 10000.0, "max_position_embeddings": 256, "tie_word_embeddings": False}


def test_registry_writes_quantized_weights_from_a_gguf(tmp_path: Path) -> None:
    import json

    from gguf import GGUFReader
    from gguf.quants import dequantize as gguf_dequantize

    from app.registry import QUANT_MARKER, has_quantized, write_quantized
    from decoding.loading import load_quantized

    gguf = tmp_path / "tiny.gguf"
    config = write_tiny_gguf(gguf, "qwen2")
    (tmp_path / "config.json").write_text(json.dumps(config))
    write_quantized(gguf, tmp_path, log=lambda _: None)
    assert has_quantized(tmp_path) and has_quantized_weights(tmp_path)
    model = load_quantized(tmp_path, torch.float32)
    embed = next(t for t in GGUFReader(gguf).tensors if t.name == "token_embd.weight")
    expected = torch.from_numpy(gguf_dequantize(embed.data, embed.tensor_type).reshape(32, 64))
    assert torch.equal(model.embed(torch.arange(32)), expected)
    logits = model.forward(torch.tensor([1, 2, 3]), model.new_cache(8), all_logits=True)
    assert logits.shape == (3, 32) and torch.isfinite(logits).all()

    other = tmp_path / "llama"
    other.mkdir()
    (other / "config.json").write_text(json.dumps(config | {"model_type": "llama"}))
    write_tiny_gguf(other / "tiny.gguf", "llama")
    write_quantized(other / "tiny.gguf", other, log=lambda _: None)
    marker = json.loads((other / QUANT_MARKER).read_text())
    assert marker["file"] is None and "llama" in marker["reason"]  # refused, not approximated
    assert has_quantized(other) and not has_quantized_weights(other)  # known: the dense weights serve


# --------------------------------------------------------------------------- sizes at the C boundary


def test_linear_refuses_activations_of_another_width(kernel: quant.NativeQuant) -> None:
    w = random_weight(4, 32, n=32, k=256)
    with pytest.raises(ValueError, match="224 values per row"):
        kernel.linear(activations(2, k=224, dtype=torch.float32), [w], None)
    # the C function checks too: it steps through the weight with the activations' width
    x = activations(1, k=224, dtype=torch.float32)
    scratch = torch.zeros(224 * 2, dtype=torch.uint8)
    xq, xs = scratch.data_ptr(), scratch.data_ptr() + 224
    bsum, xsb = xs + 224 // 8, xs + 224 // 8 + 224 // 4
    assert kernel._quantize(x.data_ptr(), 0, 1, 224, xq, xs, bsum, xsb, 1, None, 0.0) == 0
    y = torch.empty(1, 32)
    assert kernel._linear(xq, xs, bsum, xsb, 1, 224, *w.kernel_args, None, y.data_ptr(), 0, 32, 1) != 0


def test_dequantize_refuses_layouts_it_does_not_take(kernel: quant.NativeQuant) -> None:
    # a group of 64 would write past the kernel's 32-value scratch; kind 7 has no layout
    for kind, group in ((8, 64), (7, 32), (5, 16)):
        w = random_weight(8, 32, n=16, k=64)
        bad = QuantWeight(kind, group, w.n, w.k, w.q, w.d[:, : w.k // group] if group > 32 else w.d, None, None,
                          None, 1)
        with pytest.raises(RuntimeError, match="rejected"):
            kernel.dequantize(bad, None, torch.float32)
        with pytest.raises(ValueError, match="not a kernel layout"):
            bad.check("bad")


def test_embedding_refuses_token_ids_outside_the_vocabulary(kernel: quant.NativeQuant) -> None:
    w = random_weight(8, 32, n=32, k=64)
    embedding = quant.QuantEmbedding(w, torch.float32)
    assert torch.equal(embedding(torch.tensor([0, 31])), quant.dequantize_torch(w)[[0, 31]])
    for bad in (32, -1, 10**6):
        with pytest.raises(ValueError, match=f"token id {bad} is outside the vocabulary"):
            embedding(torch.tensor([3, bad]))
        with pytest.raises(ValueError, match="outside"):  # the C function refuses it as well
            kernel.dequantize(w, torch.tensor([bad]), torch.float32)


@pytest.mark.parametrize("damage", ["narrow down", "short q", "missing sub", "norm size", "extra layer"])
def test_quantized_weights_that_disagree_with_the_config_are_refused(damage: str) -> None:
    from decoding.loading import quantized_state, transformer_from_quantized

    model = tiny_model(1).model
    state = quantized_state(model)
    down = state.linears["layers.0.down"][0]
    if damage == "narrow down":  # a weight for a smaller intermediate size
        state.linears["layers.0.down"] = [quant.quantize(torch.randn(down.n, down.k - 32), 4)]
        name = "layers.0.down.0: takes"
    elif damage == "short q":  # the file's tensor is shorter than its layout says
        embed = state.linears["embed"][0]
        embed.q = embed.q[:-1].contiguous()
        name = "embed.0.q"
    elif damage == "missing sub":
        down.sub = None
        name = "layers.0.down.0.sub"
    elif damage == "norm size":
        state.dense["layers.1.mlp_norm.weight"] = state.dense["layers.1.mlp_norm.weight"][:-1]
        name = "layers.1.mlp_norm.weight"
    else:
        state.linears["layers.9.down"] = [down]
        name = "layers.9.down"
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        transformer_from_quantized(model.args, state, torch.float32)
