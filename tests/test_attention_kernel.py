"""The C attention kernel: same result as torch's attention, and a row's output independent of the call,
of the other sessions batched with it and of whether its document prefix is a shared base."""

from __future__ import annotations

import ctypes

import pytest
import torch

import decoding.attention
from decoding import kv_quant
from decoding.attention import Attend, NativeAttention, build_kernel, joined, native_attention, torch_attention
from decoding.cache import KVCache
from decoding.transformer import Rows
from tests.tiny import tiny_model

# Shapes each other build is checked on: (n_kv, group, head_dim, keys, new tokens)
OTHER_BUILD_SHAPES = [
    (2, 6, 128, 4096, 1),  # a decode row over 4K keys (Qwen2.5-1.5B's grouping)
    (2, 6, 128, 1029, 6),  # a verify block across block boundaries
    (2, 6, 64, 700, 100),  # a prefill chunk (several calls of up to 64 rows)
    (4, 1, 128, 513, 3),  # no grouping
    (1, 8, 256, 40, 5),  # head_dim 256, fewer keys than a step past the new ones
]


@pytest.fixture(scope="module")
def kernel() -> NativeAttention:
    built = native_attention()
    assert built is not None, "the attention kernel did not build: is a C compiler (cc) installed?"
    assert built.block == 512, "the lengths below are chosen around 512-key block boundaries"
    return built


def cache_slices(n_kv: int, length: int, head_dim: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, ...]:
    """Valid K/V of a preallocated cache: strided views, as the model passes them (dtype uint8:
    the 8-bit form of decoding/kv_quant.py)."""
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(n_kv, length + 37, head_dim, generator=gen)
    values = torch.randn(n_kv, length + 37, head_dim, generator=gen)
    if dtype == kv_quant.STORAGE:
        keys, values = kv_quant.quantize(keys), kv_quant.quantize(values)
    keys, values = keys.to(dtype), values.to(dtype)
    return keys[:, :length], values[:, :length]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("head_dim", [64, 128])
# 512 keys per block; 100 new tokens = a prefill chunk (beyond SMALL_T, where torch's path is SDPA)
@pytest.mark.parametrize(("length", "new"), [(1, 1), (9, 2), (600, 6), (512, 8), (512, 11), (1029, 3), (1100, 100),
                                             (100, 100)])
def test_matches_torch(kernel: NativeAttention, dtype: torch.dtype, head_dim: int, length: int, new: int) -> None:
    n_kv, group = 2, 6  # Qwen2.5-1.5B's grouping; 11 new tokens = 66 rows, more than one kernel call
    keys, values = cache_slices(n_kv, length, head_dim, dtype, seed=length)
    q = torch.randn(new, n_kv * group, head_dim, generator=torch.Generator().manual_seed(1)).to(dtype)
    ours, reference = kernel(q, keys, values, new), torch_attention(q, keys, values, new)
    tolerance = 1e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(ours.float(), reference.float(), atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_row_does_not_depend_on_the_call(kernel: NativeAttention, dtype: torch.dtype) -> None:
    # What makes a decode step and a verify pass give bit-identical logits.
    length, new = 3 * kernel.block + 11, 6
    keys, values = cache_slices(2, length, 128, dtype, seed=3)
    q = torch.randn(new, 12, 128, generator=torch.Generator().manual_seed(4)).to(dtype)
    verify = kernel(q, keys, values, new)
    for i in range(new):
        visible = length - new + i + 1
        decode = kernel(q[i : i + 1], keys[:, :visible], values[:, :visible], 1)
        assert torch.equal(decode[0], verify[i]), f"row {i} differs"
    padded = kernel(q, keys, values, 2)  # a padded decode asks for fewer rows than it passes
    assert torch.equal(padded, verify[:2])


def test_shapes_it_does_not_take_go_to_torch(kernel: NativeAttention) -> None:
    keys, values = cache_slices(2, 50, 16, torch.float32, seed=5)  # head_dim 16: not compiled
    q = torch.randn(3, 4, 16, generator=torch.Generator().manual_seed(6))
    assert not kernel.takes(q, keys, values)
    assert torch.equal(kernel(q, keys, values, 3), torch_attention(q, keys, values, 3))


def test_build_is_cached_and_loadable(tmp_path) -> None:
    first = build_kernel(tmp_path)
    assert build_kernel(tmp_path) == first and [p.name for p in tmp_path.iterdir()] == [first.name]
    assert ctypes.CDLL(str(first)).rq_attend is not None


@pytest.mark.parametrize("isa", ["avx2", "portable"])
def test_other_builds_give_the_native_builds_bits(kernel: NativeAttention, tmp_path, isa: str) -> None:
    # CPUs without AVX512-BF16 emulate vdpbf16ps (odd element first, fused, DAZ/FTZ): same bits
    if kernel.isa != "avx512-bf16":
        pytest.skip("this machine builds a non-AVX512-BF16 kernel already")
    other = NativeAttention(ctypes.CDLL(str(build_kernel(tmp_path, isa))))
    assert other.isa == isa
    shapes = OTHER_BUILD_SHAPES
    for dtype, q_dtype in ((torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32), (torch.float32,) * 2):
        for n_kv, group, head_dim, length, new in shapes:  # fp32 queries give fp32 outputs: every bit shows
            keys, values = cache_slices(n_kv, length, head_dim, dtype, seed=length)
            q = torch.randn(new, n_kv * group, head_dim, generator=torch.Generator().manual_seed(new)).to(q_dtype)
            ours = kernel(q, keys, values, new)
            assert torch.equal(other(q, keys, values, new), ours), (dtype, q_dtype, n_kv, group, head_dim, length, new)
    # denormal inputs and results, where vdpbf16ps reads zero (DAZ) and writes zero (FTZ)
    dims = torch.arange(128) % 4
    keys, values = cache_slices(2, 300, 128, torch.float32, seed=7)
    keys = torch.where(dims == 0, keys * 2.0**-130, keys).to(torch.bfloat16)  # denormal key elements...
    q = torch.randn(2, 12, 128, generator=torch.Generator().manual_seed(8))
    q = torch.where(dims == 0, q * 2.0**100, q).to(torch.bfloat16).float()  # ...times huge query elements
    values = torch.where(dims == 1, values * 2.0**-130, values)  # denormal values
    values = torch.where(dims == 2, values * 2.0**-120, values).to(torch.bfloat16)  # denormal products
    ours = kernel(q, keys, values, 2)
    assert torch.equal(other(q, keys, values, 2), ours)
    assert (ours.view(2, 12, 128)[..., dims == 1] == 0).all()  # DAZ: they add nothing


TOKENS = (1, 2, 7, 10)  # new tokens per session: a decode row, a verify block of 2, of 7, of 10
OWN_EXTRA = (0, 3, 509, 600, 17, 1100, 40, 1030)  # own slots before the new ones: across block ends


def sessions_on_base(n_sessions: int, base: tuple[torch.Tensor, torch.Tensor] | None, head_dim: int,
                     dtype: torch.dtype, q_dtype: torch.dtype, seed: int) -> list[Attend]:
    """Sessions (2 K/V heads, group 6) after a shared base, or on their own caches when base is None.
    From the fifth on, a 1-token session is a padded decode step (2 rows passed, 1 returned)."""
    gen = torch.Generator().manual_seed(seed)
    items = []
    for s in range(n_sessions):
        tokens = TOKENS[s % len(TOKENS)]
        passed = 2 if tokens == 1 and s >= len(TOKENS) else tokens
        own = cache_slices(2, passed + OWN_EXTRA[s % len(OWN_EXTRA)], head_dim, dtype, seed=seed + 1 + s)
        q = torch.randn(passed, 12, head_dim, generator=gen).to(q_dtype)
        items.append(Attend(q, (own,) if base is None else (base, own), tokens))
    return items


def assert_each_equals_alone(kernel: NativeAttention, items: list[Attend]) -> None:
    batched = kernel.attend_all(items)
    assert len(batched) == len(items)
    for i, item in enumerate(items):
        alone = kernel(item.q, *joined(item.segments), item.n_queries)  # rq_attend over the copied K/V
        assert batched[i].dtype == item.q.dtype and batched[i].shape == alone.shape, i
        assert torch.equal(batched[i], alone), f"session {i} of {len(items)} differs from its joined K/V"
        assert torch.equal(kernel.attend_all([item])[0], alone), f"session {i} differs when batched alone"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("n_shared", [0, 512, 1024, 16 * 512])
def test_batched_sessions_equal_each_session_alone(kernel: NativeAttention, dtype: torch.dtype, head_dim: int,
                                                   n_shared: int) -> None:
    # A batched pass must give every session the bits it gets alone: eta = 0 exactness at batch > 1.
    base = cache_slices(2, n_shared, head_dim, dtype, seed=n_shared) if n_shared else None
    for n_sessions in range(1, 9):
        assert_each_equals_alone(kernel, sessions_on_base(n_sessions, base, head_dim, dtype, dtype, seed=n_sessions))


def test_a_prefill_chunk_and_mixed_bases_in_one_pass(kernel: NativeAttention) -> None:
    # Rows past MAX_ROWS in one session (a 100-token prefill chunk, 600 rows per K/V head), a
    # session whose first rows end inside the base, two different bases, an empty base and sessions
    # without one, all in one attend_all. 8 threads: the base's rows are split over several work
    # items (the kernel does that when it has fewer blocks than threads to keep busy).
    dtype = torch.bfloat16
    first, second = (cache_slices(2, n, 128, dtype, seed=n) for n in (1024, 2048))
    empty = cache_slices(2, 0, 128, dtype, seed=9)
    gen = torch.Generator().manual_seed(2)
    chunk = Attend(torch.randn(100, 12, 128, generator=gen).to(dtype), (first, cache_slices(2, 130, 128, dtype, 3)),
                   100)
    inside = Attend(torch.randn(3, 12, 128, generator=gen).to(dtype), (first, cache_slices(2, 1, 128, dtype, 8)), 3)
    items = [*sessions_on_base(3, first, 128, dtype, dtype, seed=4), chunk,
             *sessions_on_base(2, second, 128, dtype, dtype, seed=5), *sessions_on_base(2, None, 128, dtype, dtype, 6),
             *sessions_on_base(2, empty, 128, dtype, dtype, seed=7), inside]
    threads = torch.get_num_threads()
    torch.set_num_threads(8)
    try:
        assert_each_equals_alone(kernel, items)
    finally:
        torch.set_num_threads(threads)
    for item, ours in zip(items, kernel.attend_all(items), strict=True):  # and near torch's attention
        reference = torch_attention(item.q, *joined(item.segments), item.n_queries)
        torch.testing.assert_close(ours.float(), reference.float(), atol=1e-2, rtol=1e-2)


def test_a_shared_base_is_read_in_place(kernel: NativeAttention, monkeypatch: pytest.MonkeyPatch) -> None:
    # The point of a shared base: no per-session copy of the document K/V per layer and pass.
    items = sessions_on_base(4, cache_slices(2, 1024, 128, torch.bfloat16, seed=1), 128, torch.bfloat16,
                             torch.bfloat16, seed=2)
    expected = [kernel(item.q, *joined(item.segments), item.n_queries) for item in items]

    def no_copy(*args, **kwargs):
        raise AssertionError("the shared base was copied")

    monkeypatch.setattr(decoding.attention, "joined", no_copy)
    monkeypatch.setattr(torch, "cat", no_copy)
    for ours, reference in zip(kernel.attend_all(items), expected, strict=True):
        assert torch.equal(ours, reference)


def test_shapes_the_batched_kernel_refuses_raise(kernel: NativeAttention) -> None:
    own = cache_slices(2, 20, 128, torch.float32, seed=1)
    q = torch.randn(3, 12, 128, generator=torch.Generator().manual_seed(2))
    unaligned = cache_slices(2, 500, 128, torch.float32, seed=3)  # a base must end on a 512-key block
    with pytest.raises(RuntimeError, match="not a whole number of 512-key blocks"):
        kernel.attend_all([Attend(q, (unaligned, own), 3)])
    aligned = cache_slices(2, 512, 128, torch.float32, seed=4)
    with pytest.raises(ValueError, match="does not fit K/V heads"):
        kernel.attend_all([Attend(q[..., :64], (aligned, own), 3)])
    with pytest.raises(ValueError, match="own K/V"):
        kernel.attend_all([Attend(q, (aligned, cache_slices(2, 20, 128, torch.bfloat16, seed=5)), 3)])
    with pytest.raises(ValueError, match="query rows"):
        kernel.attend_all([Attend(q, (aligned, own), 4)])
    with pytest.raises(ValueError, match="expected 1 or 2"):
        kernel.attend_all([Attend(q, (aligned, aligned, own), 3)])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_sessions_on_a_stored_prefix_get_their_logits_alone(kernel: NativeAttention, dtype: torch.dtype) -> None:
    # The whole path: caches on one shared base (KVCache.on_base, as the prefix cache hands them out)
    # in one forward_many pass, against each session on a private prefill of the same prefix.
    model = tiny_model(3, dtype).model
    prefix = torch.arange(1100) % 251
    stored = model.new_cache(1100)
    model.prefill(prefix, stored)
    questions = [torch.tensor([7, 8, 9, 10, 11, 12, 13]), torch.tensor([40]), torch.tensor([50, 51, 52])]
    shared = [KVCache.on_base(stored.keys, stored.values, 1100, 1200, stored.head_dim) for _ in questions]
    assert all(cache.offset == 1024 for cache in shared)  # two 512-key blocks read from the base in place
    batched = model.forward_many([Rows(q, cache, all_logits=True) for q, cache in zip(questions, shared, strict=True)])
    for question, logits in zip(questions, batched, strict=True):
        private = model.new_cache(1200)
        model.prefill(prefix, private)
        assert torch.equal(model.forward(question, private, all_logits=True), logits)


@pytest.mark.parametrize("isa", ["avx2", "portable"])
def test_other_builds_give_the_native_builds_bits_batched(kernel: NativeAttention, tmp_path, isa: str) -> None:
    if kernel.isa != "avx512-bf16":
        pytest.skip("this machine builds a non-AVX512-BF16 kernel already")
    other = NativeAttention(ctypes.CDLL(str(build_kernel(tmp_path, isa))))
    for dtype, q_dtype in ((torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32), (torch.float32,) * 2):
        base = cache_slices(2, 1024, 128, dtype, seed=11)
        items = sessions_on_base(6, base, 128, dtype, q_dtype, seed=12)
        for i, (ours, theirs) in enumerate(zip(kernel.attend_all(items), other.attend_all(items), strict=True)):
            assert torch.equal(theirs, ours), (isa, dtype, q_dtype, i)


# ---- 8-bit K/V (decoding/kv_quant.py): the kernel reads it with integer dot products ----
Q8 = kv_quant.STORAGE


def q8_reference(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, n: int) -> torch.Tensor:
    """What the kernel computes for 8-bit K/V, in fp32 torch: q's own 8-bit form (per row, head
    and 32 channels, as the kernel quantizes it) over the values the cache stands for."""
    head_dim = q.shape[2]
    quantized = kv_quant.dequantize(kv_quant.quantize(q.float()), head_dim)
    return torch_attention(quantized, keys, values, n)


@pytest.mark.parametrize("q_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize(("length", "new"), [(1, 1), (9, 2), (600, 6), (512, 11), (1029, 3), (1100, 100)])
def test_8bit_matches_torch(kernel: NativeAttention, q_dtype: torch.dtype, head_dim: int, length: int,
                            new: int) -> None:
    keys, values = cache_slices(2, length, head_dim, Q8, seed=length)
    q = torch.randn(new, 12, head_dim, generator=torch.Generator().manual_seed(1)).to(q_dtype)
    assert kernel.takes(q, keys, values), "the kernel reads 8-bit K/V itself"
    ours = kernel(q, keys, values, new).float()
    # The kernel rounds each weight p * s (probability times the value's group scale) to bf16
    # before the value sum, as the bf16 path rounds p: relative 2^-9 per term. With few keys an
    # output is a few values of magnitude up to ~4, so its error reaches ~4 * 2^-9 - hence 2e-2,
    # not the 1e-2 of the bf16 path (whose values are N(0, 1) too, but sums order alike).
    torch.testing.assert_close(ours, q8_reference(q, keys, values, new).float(), atol=2e-2, rtol=2e-2)
    # and near the unquantized query too: q's 8-bit rounding moves a score by ~1/254 of its scale
    torch.testing.assert_close(ours, torch_attention(q.float(), keys, values, new), atol=3e-2, rtol=3e-2)


def with_threads(n: int, fn):
    threads = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn()
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("q_dtype", [torch.bfloat16, torch.float32])
def test_8bit_a_row_does_not_depend_on_the_call(kernel: NativeAttention, q_dtype: torch.dtype) -> None:
    # Decode == verify bit for bit on an 8-bit cache, whatever the thread count: each row's query is
    # quantized alone, and its blocks are combined in a fixed order.
    length, new = 3 * kernel.block + 11, 7
    keys, values = cache_slices(2, length, 128, Q8, seed=3)
    q = torch.randn(new, 12, 128, generator=torch.Generator().manual_seed(4)).to(q_dtype)
    assert kernel.takes(q, keys, values)
    verify = with_threads(1, lambda: kernel(q, keys, values, new))
    for threads in (2, 3):
        assert torch.equal(with_threads(threads, lambda: kernel(q, keys, values, new)), verify), threads
    for i in range(new):
        visible = length - new + i + 1
        for threads in (1, 2, 3):
            decode = with_threads(threads, lambda v=visible, i=i: kernel(q[i : i + 1], keys[:, :v], values[:, :v], 1))
            assert torch.equal(decode[0], verify[i]), f"row {i} differs with {threads} threads"
    assert torch.equal(kernel(q, keys, values, 2), verify[:2])  # a padded decode
    chunk = torch.randn(150, 12, 128, generator=torch.Generator().manual_seed(5)).to(q_dtype)  # past MAX_ROWS
    whole = kernel(chunk, keys, values, 150)
    for first, stop in ((0, 1), (0, 64), (37, 101), (149, 150)):
        part = kernel(chunk[:stop], keys[:, : length - 150 + stop], values[:, : length - 150 + stop], stop)
        assert torch.equal(part[first:stop], whole[first:stop]), (first, stop)


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("n_shared", [0, 512, 16 * 512])
def test_8bit_batched_sessions_equal_each_session_alone(kernel: NativeAttention, head_dim: int,
                                                        n_shared: int) -> None:
    base = cache_slices(2, n_shared, head_dim, Q8, seed=n_shared) if n_shared else None
    for n_sessions in (1, 2, 5, 8):
        items = sessions_on_base(n_sessions, base, head_dim, Q8, torch.bfloat16, seed=n_sessions)
        assert all(kernel.takes(item.q, k, v) for item in items for k, v in item.segments)
        assert_each_equals_alone(kernel, items)


def test_8bit_prefill_chunk_and_sessions_in_one_pass(kernel: NativeAttention) -> None:
    # A 100-token chunk (600 rows per K/V head) beside decode and verify sessions on an 8-bit base,
    # 8 threads (the base's rows split over several work items), fp32 queries: every bit shows.
    base = cache_slices(2, 1024, 128, Q8, seed=1)
    gen = torch.Generator().manual_seed(2)
    chunk = Attend(torch.randn(100, 12, 128, generator=gen), (base, cache_slices(2, 130, 128, Q8, 3)), 100)
    items = [*sessions_on_base(3, base, 128, Q8, torch.float32, seed=4), chunk]
    assert all(kernel.takes(item.q, k, v) for item in items for k, v in item.segments)
    with_threads(8, lambda: assert_each_equals_alone(kernel, items))
    for item, ours in zip(items, kernel.attend_all(items), strict=True):
        reference = q8_reference(item.q, *joined(item.segments), item.n_queries)
        torch.testing.assert_close(ours, reference, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("isa", ["avx2", "portable"])
def test_other_builds_give_the_native_builds_bits_8bit(kernel: NativeAttention, tmp_path, isa: str) -> None:
    if kernel.isa != "avx512-bf16":
        pytest.skip("this machine builds a non-AVX512 kernel already")
    other = NativeAttention(ctypes.CDLL(str(build_kernel(tmp_path, isa))))
    shapes = OTHER_BUILD_SHAPES
    for q_dtype in (torch.bfloat16, torch.float32):  # fp32 queries give fp32 outputs: every bit shows
        for n_kv, group, head_dim, length, new in shapes:
            keys, values = cache_slices(n_kv, length, head_dim, Q8, seed=length)
            q = torch.randn(new, n_kv * group, head_dim, generator=torch.Generator().manual_seed(new)).to(q_dtype)
            assert kernel.takes(q, keys, values) and other.takes(q, keys, values)
            ours = kernel(q, keys, values, new)
            assert torch.equal(other(q, keys, values, new), ours), (isa, q_dtype, n_kv, group, head_dim, length, new)
        items = sessions_on_base(6, cache_slices(2, 1024, 128, Q8, seed=11), 128, Q8, q_dtype, seed=12)
        for i, (ours, theirs) in enumerate(zip(kernel.attend_all(items), other.attend_all(items), strict=True)):
            assert torch.equal(theirs, ours), (isa, q_dtype, i)
    # extremes: a zero query group, a query group with one huge channel, zero-scale (all-zero) keys
    # and values, and scales small enough that p * s is denormal before its bf16 rounding
    keys, values = cache_slices(2, 300, 128, torch.float32, seed=7)
    keys[:, :40] = 0.0
    values[:, 40:80] *= 2.0**-120
    keys, values = kv_quant.quantize(keys), kv_quant.quantize(values)
    q = torch.randn(2, 12, 128, generator=torch.Generator().manual_seed(8))
    q[:, :, :32] = 0.0
    q[:, :, 40] = 1e30
    ours = kernel(q, keys, values, 2)
    assert torch.equal(other(q, keys, values, 2), ours)


def test_8bit_shapes_refused_raise(kernel: NativeAttention) -> None:
    q = torch.randn(3, 12, 128, generator=torch.Generator().manual_seed(2))
    q8_k, q8_v = cache_slices(2, 20, 128, Q8, seed=1)
    bf16_k, bf16_v = cache_slices(2, 20, 128, torch.bfloat16, seed=1)
    with pytest.raises(ValueError, match="mixed forms"):
        kernel(q, q8_k, bf16_v, 3)
    base = cache_slices(2, 512, 128, Q8, seed=4)
    with pytest.raises(ValueError, match="one form per session"):
        kernel.attend_all([Attend(q, (base, (bf16_k, bf16_v)), 3)])
    with pytest.raises(ValueError, match="8-bit rows of another head_dim"):
        kernel(q[..., :64], q8_k, q8_v, 3)
    with pytest.raises(ValueError, match="8-bit rows of another head_dim"):
        kernel.attend_all([Attend(q[..., :64], (base, (q8_k, q8_v)), 3)])
    # At the C boundary: a head_dim the kernel is not built for (96: whole 32-channel groups, so a
    # valid 8-bit form that torch reads) returns a status, which the binding raises.
    wide_k, wide_v = cache_slices(2, 20, 96, Q8, seed=5)
    q96 = torch.randn(3, 12, 96, generator=torch.Generator().manual_seed(6))
    assert not kernel.takes(q96, wide_k, wide_v)
    with pytest.raises(RuntimeError, match="rejected rows"):
        kernel._attend(q96, wide_k, wide_v, 0, 3)
    with pytest.raises(RuntimeError, match="head_dim, group or K/V head count it does not take"):
        kernel._attend_shared([Attend(q96, (cache_slices(2, 512, 96, Q8, seed=7), (wide_k, wide_v)), 3)])
