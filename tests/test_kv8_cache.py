"""The 8-bit KV form in the caches: what is written, and every slot operation keeping its bytes (tiny models)."""

from __future__ import annotations

import pytest
import torch

from decoding import kv_quant
from decoding.cache import KVCache, StreamingCache, bytes_per_token
from decoding.loading import pick_kv_dtype
from tests.tiny import tiny_model

Q8 = kv_quant.STORAGE


@pytest.fixture(scope="module")
def model():
    return tiny_model(1, kv_dtype=Q8).model


def _filled(model, n: int, capacity: int) -> tuple[KVCache, torch.Tensor]:
    ids = torch.randint(0, 256, (n + 8,), generator=torch.Generator().manual_seed(n))
    cache = model.new_cache(capacity)
    model.prefill(ids[:n], cache)
    return cache, ids


def _slots(cache: KVCache, layer: int, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
    return cache.span(layer, start, end)


def test_an_8bit_cache_stores_quantized_rows(model) -> None:
    cache, _ = _filled(model, 40, 48)
    a = model.args
    assert cache.quantized and cache.dtype == Q8 and cache.head_dim == a.head_dim
    assert cache.keys[0].shape == (a.n_kv_heads, 48, kv_quant.row_bytes(a.head_dim))
    # What was written is the quantized form of the layer's keys: dequantized, they are the fp32
    # cache's keys up to the 8-bit rounding (a plain cache of the same weights, same tokens).
    plain = tiny_model(1).model
    reference, _ = _filled(plain, 40, 48)
    first = kv_quant.dequantize(cache.keys[0][:, :40], a.head_dim)
    error = (first - reference.keys[0][:, :40]).norm() / reference.keys[0][:, :40].norm()
    assert 0 < float(error) < 0.02
    assert torch.equal(cache.keys[0][:, :40], kv_quant.quantize(reference.keys[0][:, :40]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("tokens", [1, 6, 300])
def test_the_c_writer_stores_quantizes_bytes(dtype: torch.dtype, tokens: int) -> None:
    """kernels/kv_quant.c writes into a cache's slots the bytes kv_quant.quantize computes, from the
    strided [n_kv, T, D] views a layer hands over; with a NaN its group's scale is NaN (its bits
    are torch's own choice) and its values zero."""
    kernel = kv_quant.native_kv_quant()
    if kernel is None:
        pytest.skip(f"no C kernel here: {kv_quant.kv_quant_kernel()[1]}")
    gen = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, 2, 128, generator=gen) * torch.exp(3 * torch.randn(tokens, 2, 128, generator=gen))
    x[0, 0, :32] = 0.0  # a zero group: scale 0, values 0
    x[-1, 1, 32:64] *= 1e-39  # denormal scales
    x[-1, 0, 64:96] *= 1e30
    k = x.to(dtype).transpose(0, 1)  # as the model's write hands K and V over: strided, each its own way
    v = (torch.cat([x, x], dim=2).to(dtype) * 0.5)[:, :, 128:].transpose(0, 1)
    assert k.stride() != v.stride()
    keys = torch.zeros(2, tokens + 9, kv_quant.row_bytes(128), dtype=Q8)
    values = torch.zeros_like(keys)
    slots = (keys[:, 4 : 4 + tokens], values[:, 4 : 4 + tokens])
    assert kernel.takes(k, v, *slots)
    kv_quant.write(k, v, *slots)
    assert torch.equal(slots[0], kv_quant.quantize(k)) and torch.equal(slots[1], kv_quant.quantize(v))
    assert not keys[:, :4].any() and not keys[:, 4 + tokens :].any()  # nothing outside the slots
    k = k.clone()
    k[0, 0, 3] = float("nan")
    kv_quant.write(k, v, *slots)
    written, reference = slots[0].clone(), kv_quant.quantize(k)
    nan_scale = written[0, 0, 128:130].view(torch.bfloat16)
    assert torch.isnan(nan_scale).all() and torch.isnan(reference[0, 0, 128:130].view(torch.bfloat16)).all()
    assert not written[0, 0, :32].any()
    written[0, 0, 128:130] = reference[0, 0, 128:130]
    assert torch.equal(written, reference)


def test_the_writer_quantizes_in_torch_what_the_kernel_does_not_take() -> None:
    k = torch.randn(2, 3, 128, dtype=torch.float16)
    keys = torch.zeros(2, 3, kv_quant.row_bytes(128), dtype=Q8)
    values = torch.zeros_like(keys)
    kernel = kv_quant.native_kv_quant()
    assert kernel is None or not kernel.takes(k, k, keys, values)
    kv_quant.write(k, k, keys, values)
    assert torch.equal(keys, kv_quant.quantize(k)) and torch.equal(values, keys)


def test_a_verify_pass_writes_the_decode_steps_bytes(model) -> None:
    """Quantizing is per token: three tokens written at once store what three steps store."""
    cache, ids = _filled(model, 30, 40)
    stepped = cache.clone()
    for i in range(30, 33):
        model.forward(ids[i : i + 1], stepped)
    model.forward(ids[30:33], cache, all_logits=True)
    for layer in range(model.args.n_layers):
        assert torch.equal(cache.keys[layer][:, :33], stepped.keys[layer][:, :33])
        assert torch.equal(cache.values[layer][:, :33], stepped.values[layer][:, :33])


def test_slot_operations_keep_the_8bit_bytes(model) -> None:
    """clone, gather, a streaming window, a shared base, span/slots and growth copy bytes, never
    values: each holds exactly the full cache's rows of its slots."""
    full, _ = _filled(model, 600, 8)  # small on purpose: reserve grows the 8-bit storage
    layers = range(model.args.n_layers)
    gathered = KVCache.gather(full, [(0, 10), (300, 600)], spare=4, next_position=600)
    window = StreamingCache.from_prefix(full, sinks=4, window=100, spare=4)
    tensors = full.slots(0, 600)
    based = KVCache.on_base([tensors[f"k{i}"] for i in layers], [tensors[f"v{i}"] for i in layers], 600, 700,
                            model.args.head_dim)
    copy = full.clone()
    for made in (gathered, window, based, copy):
        assert made.quantized and made.head_dim == model.args.head_dim
    assert based.offset == 512  # the base is read in place up to a KV_BLOCK boundary
    for layer in layers:
        k, v = _slots(full, layer, 0, 600)
        assert tensors[f"k{layer}"].dtype == Q8 and torch.equal(tensors[f"k{layer}"], k)
        assert torch.equal(_slots(copy, layer, 0, 600)[1], v)
        assert torch.equal(_slots(based, layer, 0, 600)[0], k) and torch.equal(_slots(based, layer, 500, 600)[1],
                                                                               v[:, 500:])
        assert torch.equal(_slots(gathered, layer, 0, 310)[0], torch.cat([k[:, :10], k[:, 300:]], dim=1))
        assert torch.equal(_slots(window, layer, 0, 104)[1], torch.cat([v[:, :4], v[:, 500:]], dim=1))


def test_an_8bit_base_needs_the_head_dim_its_rows_hold(model) -> None:
    full, _ = _filled(model, 20, 24)
    tensors = full.slots(0, 20)
    layers = range(model.args.n_layers)
    with pytest.raises(ValueError, match="do not hold head_dim 32"):  # the rows hold 64 channels
        KVCache.on_base([tensors[f"k{i}"] for i in layers], [tensors[f"v{i}"] for i in layers], 20, 30, 32)


def test_bytes_per_token_are_row_bytes_over_twice_head_dim_of_bf16s() -> None:
    """In memory: a token's K/V bytes in the caches (prefix cache and chunk KV store these tensors)."""
    d = 128
    q8, bf16 = bytes_per_token(28, 2, d, Q8), bytes_per_token(28, 2, d, torch.bfloat16)
    assert q8 * 2 * d == bf16 * kv_quant.row_bytes(d)
    model = tiny_model(1, torch.bfloat16, kv_dtype=Q8).model
    plain = tiny_model(1, torch.bfloat16).model
    a = model.args
    held = [model.new_cache(100), plain.new_cache(100)]
    per_token = [sum(t.nbytes for t in [*c.keys, *c.values]) // 100 for c in held]
    assert per_token == [bytes_per_token(a.n_layers, a.n_kv_heads, a.head_dim, dtype) for dtype in (Q8, torch.bfloat16)]
    assert per_token[0] * 2 * a.head_dim == per_token[1] * kv_quant.row_bytes(a.head_dim)


def test_the_kv_form_is_the_models_dtype_or_8bit() -> None:
    model = tiny_model(1).model
    assert model.kv_dtype == torch.float32  # None: the model's own dtype
    model.kv_dtype = Q8
    assert model.kv_dtype == Q8 and model.new_cache(4).quantized
    model.kv_dtype = None
    assert model.kv_dtype == torch.float32 and not model.new_cache(4).quantized
    with pytest.raises(ValueError, match="8-bit form"):
        model.kv_dtype = torch.float16
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert pick_kv_dtype("auto", cpu) == Q8 and pick_kv_dtype("auto", gpu) is None
    assert pick_kv_dtype("q8", gpu) == Q8 and pick_kv_dtype("bf16", cpu) is None
    with pytest.raises(ValueError, match="unknown KV cache form"):
        pick_kv_dtype("q4", cpu)
