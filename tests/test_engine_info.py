"""Which engine runs is said: the kernels' own ISA, and why a slow fallback runs, once on stderr."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from app.config import ModelSettings, Settings
from app.pipeline import Engine
from decoding import attention, engine_info, kv_quant, quant
from tests.test_quant_linear import quantized
from tests.tiny import tiny_model

KEYS = {"engine", "linear_kernel", "attention_kernel", "kv_cache", "threads", "warning"}


@pytest.fixture
def fresh_kernels(monkeypatch, tmp_path: Path) -> Iterator[pytest.MonkeyPatch]:
    """Kernels loaded anew under the test's environment (an empty build cache), and again after it."""
    def clear() -> None:
        quant.quant_kernel.cache_clear()
        attention.attention_kernel.cache_clear()
        engine_info._print_once.cache_clear()

    monkeypatch.setenv("RAPIDQA_KERNEL_CACHE", str(tmp_path / "kernels"))
    clear()
    yield monkeypatch
    monkeypatch.undo()
    clear()


def test_full_speed_engine_has_no_warning() -> None:
    description = engine_description_of_quantized()
    assert set(description) == KEYS and description["engine"] == "quantized"
    assert description["linear_kernel"] == f"C {quant.native_quant().isa}"
    assert description["attention_kernel"] == f"C {attention.native_attention().isa}"
    assert description["threads"] == str(torch.get_num_threads()) and description["warning"] == ""
    dense = engine_info.engine_description(tiny_model(1))
    assert dense["engine"] == "dense" and dense["linear_kernel"].startswith("torch")


def test_the_description_and_its_line_name_the_kv_form(monkeypatch: pytest.MonkeyPatch) -> None:
    from app.engine_label import engine_label

    q8 = quantized(tiny_model(1), torch.bfloat16, kv_quant.STORAGE)
    plain = quantized(tiny_model(1), torch.bfloat16)
    assert engine_info.engine_description(plain)["kv_cache"] == "bf16"
    assert engine_info.engine_description(tiny_model(1))["kv_cache"] == "fp32"
    description = engine_info.engine_description(q8)
    assert description["kv_cache"] == "q8" and ", KV q8, " in engine_label(description)
    assert ", KV bf16, " in engine_label(engine_info.engine_description(plain))
    assert "KV" not in engine_label({"engine": "dense", "threads": "2"})  # a record from before the KV form
    # A kernel that does not read the 8-bit form leaves attention to torch: said, with the way back.
    kernel = attention.native_attention()
    assert kernel is not None
    real_takes = type(kernel).takes
    monkeypatch.setattr(type(kernel), "takes", lambda self, q, k, v: k.dtype != kv_quant.STORAGE
                        and real_takes(self, q, k, v))
    slow = engine_info.engine_description(q8)
    assert slow["attention_kernel"].startswith("torch sdpa (the C kernel does not read q8 K/V")
    assert "--kv-dtype bf16 keeps the C kernel" in slow["warning"]
    assert engine_info.engine_description(plain)["attention_kernel"] == f"C {kernel.isa}"


def engine_description_of_quantized() -> dict[str, str]:
    return engine_info.engine_description(quantized(tiny_model(1)))


def test_without_a_compiler_the_description_and_stderr_say_so(fresh_kernels, capsys) -> None:
    fresh_kernels.setenv("CC", "/nonexistent/cc")
    description = engine_description_of_quantized()
    assert description["engine"] == "quantized"
    assert description["linear_kernel"].startswith("torch dequantize-per-call (no C compiler (/nonexistent/cc)")
    assert description["attention_kernel"].startswith("torch sdpa (no C compiler")
    assert "dequantized on every call" in description["warning"] and "install gcc" in description["warning"]
    assert "attention runs on torch" in description["warning"]
    engine_info.warn_once(description)
    engine_info.warn_once(description)  # once per process
    assert capsys.readouterr().err == f"rapidqa: {description['warning']}\n"


def test_a_compile_error_is_named(fresh_kernels) -> None:
    fresh_kernels.setenv("CC", "false")  # a "compiler" that always fails
    linear = engine_description_of_quantized()["linear_kernel"]
    assert "quant_linear.c did not compile with false" in linear, linear


def test_switched_off_kernels_say_how_to_switch_them_on(fresh_kernels) -> None:
    fresh_kernels.setenv("RAPIDQA_NATIVE_QUANT", "0")
    description = engine_description_of_quantized()
    assert "switched off by RAPIDQA_NATIVE_QUANT=0: unset it" in description["warning"]
    assert description["attention_kernel"].startswith("C ")


def test_a_forced_instruction_set_is_reported_by_the_kernels(fresh_kernels) -> None:
    fresh_kernels.setenv("RAPIDQA_KERNEL_ISA", "avx2")
    description = engine_description_of_quantized()
    assert description["linear_kernel"] == "C avx2" and description["attention_kernel"] == "C avx2"
    assert "RAPIDQA_KERNEL_ISA=avx2" in description["warning"]


def test_an_unknown_instruction_set_is_refused(fresh_kernels) -> None:
    fresh_kernels.setenv("RAPIDQA_KERNEL_ISA", "avx9")
    with pytest.raises(ValueError, match="RAPIDQA_KERNEL_ISA='avx9'"):
        quant.native_quant()


@pytest.mark.real_models
def test_loading_a_model_warns_once_on_stderr(fresh_kernels, capsys, small_model_dir: Path, tmp_path: Path) -> None:
    fresh_kernels.setenv("CC", "/nonexistent/cc")
    for _ in range(2):  # two engines, each loading the model: the warning is said once per process
        Engine(Settings(home=tmp_path, models=ModelSettings(target=str(small_model_dir)))).model(str(small_model_dir))
    err = capsys.readouterr().err
    assert err.count("rapidqa: Slow engine: every quantized weight is dequantized on every call") == 1, err
