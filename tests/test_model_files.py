"""A prepared model directory holds what its engine reads: config, tokenizer and the kernel layout for
the CPU engine, the bf16 weights only once something that reads them asks (app/registry.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from app.registry import DENSE_FILE, GGUF_FILE, convert_gguf, ensure_dense, has_dense, is_ready, write_quantized
from decoding.loading import load_model
from tests.conftest import SMALL, require_model

pytestmark = pytest.mark.real_models


@pytest.fixture(scope="module")
def light_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 0.5B prepared as `ask models` now does on a CPU: no bf16 weights."""
    prepared = require_model(SMALL)
    target = tmp_path_factory.mktemp("models") / SMALL
    gguf = prepared / GGUF_FILE
    convert_gguf(gguf, target, source={"test": "light"}, log=lambda _: None)
    os.symlink(gguf, target / GGUF_FILE)
    write_quantized(target / GGUF_FILE, target, log=lambda _: None)
    return target


def test_the_model_files_match_a_full_conversions_without_reading_a_tensor(light_dir: Path) -> None:
    prepared = require_model(SMALL)
    assert is_ready(light_dir) and not has_dense(light_dir)
    ours, theirs = (json.loads((d / "config.json").read_text()) for d in (light_dir, prepared))
    ours.pop("_name_or_path"), theirs.pop("_name_or_path")  # where each was staged
    assert ours == theirs
    assert (light_dir / "generation_config.json").read_text() == (prepared / "generation_config.json").read_text()
    assert (light_dir / "tokenizer.json").read_bytes() == (prepared / "tokenizer.json").read_bytes()


def test_the_cpu_engine_answers_without_bf16_weights_and_they_come_when_asked(light_dir: Path) -> None:
    prepared = require_model(SMALL)
    ensure_dense(light_dir / GGUF_FILE, light_dir, wanted=False, log=lambda _: None)
    assert not has_dense(light_dir)  # the kernel layout serves: nothing converted
    tokens = torch.tensor([9707, 11, 1879, 0])
    light = load_model(SMALL, light_dir, torch.bfloat16, torch.device("cpu"), quantized=True)
    full = load_model(SMALL, prepared, torch.bfloat16, torch.device("cpu"), quantized=True)
    assert light.weights == "quantized" and light.stop_ids == full.stop_ids
    logits = [m.model.forward(tokens, m.model.new_cache(8)) for m in (light, full)]
    assert torch.equal(logits[0], logits[1])

    said: list[str] = []
    ensure_dense(light_dir / GGUF_FILE, light_dir, wanted=True, log=said.append)
    assert has_dense(light_dir) and "bf16 weights" in said[0]
    with safe_open(str(light_dir / DENSE_FILE), "pt") as ours, safe_open(str(prepared / DENSE_FILE), "pt") as theirs:
        assert sorted(ours.keys()) == sorted(theirs.keys())
        for name in ("model.embed_tokens.weight", "model.layers.3.mlp.down_proj.weight", "model.norm.weight"):
            assert torch.equal(ours.get_tensor(name), theirs.get_tensor(name)), name
    dense = load_model(SMALL, light_dir, torch.bfloat16, torch.device("cpu"))
    assert dense.weights == "dense"
