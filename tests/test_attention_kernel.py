"""The C attention kernel: same result as torch's attention, and a row's output independent of the call."""

from __future__ import annotations

import ctypes

import pytest
import torch

from decoding.attention import NativeAttention, build_kernel, native_attention, torch_attention


@pytest.fixture(scope="module")
def kernel() -> NativeAttention:
    built = native_attention()
    assert built is not None, "the attention kernel did not build: is a C compiler (cc) installed?"
    assert built.block == 512, "the lengths below are chosen around 512-key block boundaries"
    return built


def cache_slices(n_kv: int, length: int, head_dim: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, ...]:
    """Valid K/V of a preallocated cache: strided views, as the model passes them."""
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(n_kv, length + 37, head_dim, generator=gen).to(dtype)
    values = torch.randn(n_kv, length + 37, head_dim, generator=gen).to(dtype)
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
