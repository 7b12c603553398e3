"""bench.decode's peak memory per method: the peak restarts before each method."""

from __future__ import annotations

import gc

import pytest
import torch

from bench.decode import peak_rss_gb, reset_peak_rss


def test_the_peak_restarts_so_each_method_gets_its_own() -> None:
    if not reset_peak_rss():
        pytest.skip("this system cannot restart the peak (no writable /proc/self/clear_refs)")
    before = peak_rss_gb()
    block = torch.ones(50_000_000)  # 200 MB, written
    high = peak_rss_gb()
    del block
    gc.collect()
    assert before is not None and high is not None and high - before > 0.15
    assert reset_peak_rss()
    after = peak_rss_gb()
    assert after is not None and after < high - 0.1
