"""bench.dot_rate: the attention floor's arithmetic, and the rates it measures where the instructions exist."""

from __future__ import annotations

import pytest

from bench.dot_rate import FORMS, HEADS, LAYERS, rates, row_key_pairs
from decoding.attention import native_attention
from decoding.native import KernelUnavailable


def test_row_key_pairs_count_the_causal_chunk_over_every_head_and_layer() -> None:
    # a 4-token chunk after 10 cached tokens: its tokens read 11, 12, 13 and 14 keys
    assert row_key_pairs(10, 4) == HEADS * LAYERS * (11 + 12 + 13 + 14)


def test_each_form_costs_fewer_dot_products_than_the_last() -> None:
    # (vpdpbusd, vdpbf16ps) per row-key pair at head_dim 128: 128 channels, 64 or 32 per instruction, Q.K and V
    assert list(FORMS.values()) == [(0, 8), (2, 4), (4, 0)]


def test_rates_are_measured_where_vnni_and_bf16_exist() -> None:
    kernel = native_attention()  # its AVX-512 build takes both instructions, as the probe does
    if kernel is not None and kernel.isa == "avx512-bf16":
        int8_rate, bf16_rate = rates(threads=1, steps=200_000)
        assert int8_rate > 1e8 and bf16_rate > 1e8  # instructions per second: any core does far more
    else:
        with pytest.raises(KernelUnavailable):
            rates(threads=1, steps=1000)
