"""Shared fixtures: where the real embedded models are, and engines built on them; the tiny pair and
the attention paths the exactness suites (solo and batched) run on."""

from __future__ import annotations

from pathlib import Path

import pytest

import decoding.attention
import decoding.transformer
from app.options import quiet_environment
from decoding.attention import torch_attention_all
from tests.resources import LARGE, SMALL, real_models_dir, require_model
from tests.tiny import EXACT_FORM_IDS, EXACT_FORMS, EXACT_VOCAB, tiny_model

quiet_environment()  # before any test imports a library that reads these

REPO = Path(__file__).resolve().parent.parent
__all__ = ["LARGE", "SMALL", "real_models_dir", "require_model"]  # test modules import these from here


@pytest.fixture(scope="session")
def small_model_dir() -> Path:
    return require_model(SMALL)


@pytest.fixture(scope="session")
def large_model_dir() -> Path:
    return require_model(LARGE)


@pytest.fixture(params=["native", "torch"])
def attention(request, monkeypatch) -> str:
    """Run an exactness suite on the C attention kernel and on the torch path (what a GPU, or a
    machine without a C compiler, runs)."""
    if request.param == "torch":
        monkeypatch.setattr(decoding.transformer, "attention_for", lambda device: torch_attention_all)
    elif decoding.attention.native_attention() is None:
        pytest.fail("the C attention kernel did not build on this machine")
    return request.param


@pytest.fixture(scope="module", params=EXACT_FORMS, ids=EXACT_FORM_IDS)
def small_vocab_pair(request):
    """A tiny target and a perturbed copy as drafter: they agree often, not always. Each activation
    dtype with a KV cache in that dtype and with the 8-bit KV form."""
    dtype, kv_dtype = request.param
    pair = (tiny_model(1, dtype, vocab=EXACT_VOCAB, kv_dtype=kv_dtype),
            tiny_model(2, dtype, noise_from=1, noise=0.01, vocab=EXACT_VOCAB, kv_dtype=kv_dtype))
    assert all(m.model.new_cache(1).quantized == (kv_dtype is not None) for m in pair)  # the form really runs
    return pair
