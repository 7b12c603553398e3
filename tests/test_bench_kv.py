"""The KV-form benches: bench.prefill_depth (rows per KV form and llama-bench's per cache type,
depth-major), bench.decode's KV forms and llama.cpp cache types, and the filled caches both time."""

from __future__ import annotations

import dataclasses
import json
import os
import stat
from argparse import Namespace
from pathlib import Path

import pytest
import torch

import bench.kv_forms as kv_forms
import bench.prefill_depth as prefill_depth
from app.config import Settings
from bench import decode as bench_decode
from bench.decode import bench_context, build_index, kv_bytes_per_token, kv_form_settings, verify_over_decode
from bench.kv_fill import SEED_SLOTS, filled_cache
from bench.kv_forms import load_options, parse_kv_dtypes, settings_for
from bench.peers import (
    LlamaCpp,
    llama_bench_command,
    parse_llama_bench,
    peer_name,
    plain_decode_command,
    speculative_command,
)
from decoding.settings import DecodingSettings
from tests.tiny import tiny_model
from tests.tiny_engine import tiny_engine

DECODING = DecodingSettings(method="lc", max_new_tokens=8, gamma=4, eta=0.0)

FAKE_LLAMA_BENCH = """#!/bin/bash
echo "$@" >> "$(dirname "$0")/calls.txt"
K=f16
while [ $# -gt 0 ]; do case "$1" in -p) P=$2; shift;; -d) D=$2; shift;; -ctk) K=$2; shift;; esac; shift; done
echo "[{\\"n_prompt\\": $P, \\"n_depth\\": $D, \\"samples_ns\\": [2000000000, 1000000000, 3000000000],
  \\"type_k\\": \\"$K\\", \\"type_v\\": \\"$K\\", \\"flash_attn\\": -1}]"
"""


@pytest.fixture
def tiny_loader(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[dict[str, object]]:
    """bench.prefill_depth loads a tiny bf16 model from tmp_path/model (which has a model.gguf);
    returns the keyword arguments of each load."""
    loads: list[dict[str, object]] = []
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model.gguf").write_bytes(b"")

    def load(name, directory, dtype, device, quantized=False):  # type: ignore[no-untyped-def]
        loads.append({"name": name, "dtype": dtype, "quantized": quantized})
        return tiny_model(1, dtype=torch.bfloat16)

    monkeypatch.setattr(prefill_depth, "load_model", load)
    monkeypatch.setattr(prefill_depth, "resolve_model", lambda spec, models_dir: tmp_path / "model")
    return loads


def fake_llama_bench(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    tool = bin_dir / "llama-bench"
    tool.write_text(FAKE_LLAMA_BENCH)
    tool.chmod(tool.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("RAPIDQA_LLAMA_CPP_BIN", str(bin_dir))
    return bin_dir


def test_prefill_depth_times_chunks_and_their_attention(tiny_loader: list[dict[str, object]], tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out.json"
    assert prefill_depth.main(["--model", "tiny", "--depths", "0,300", "--chunk", "32", "--kv-dtypes", "bf16",
                               "--no-peers", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["depth"], r["engine"], r["kv"]) for r in rows] == [(0, "rapidqa", "bf16"), (300, "rapidqa", "bf16")]
    for row in rows:
        # attention is timed through the model's attention function: part of the pass, never none of it
        assert 0 < row["attention_s"] < row["chunk_s"], row
        assert row["tokens_per_s"] == pytest.approx(32 / row["chunk_s"]) and row["vs_first"] == 1.0
    assert "llama.cpp" not in capsys.readouterr().out  # --no-peers: not even a note that they are missing


def test_prefill_depth_rows_are_depth_major_with_llama_bench_per_cache(
        tiny_loader: list[dict[str, object]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bin_dir = fake_llama_bench(tmp_path, monkeypatch)
    out = tmp_path / "out.json"
    prefill_depth.main(["--model", "tiny", "--depths", "0,64", "--chunk", "16", "--kv-dtypes", "bf16",
                        "--peer-runs", "3", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [(r["depth"], r["engine"], r["kv"]) for r in rows] == [
        (0, "rapidqa", "bf16"), (0, "llama.cpp", "f16"), (0, "llama.cpp", "q8_0"),
        (64, "rapidqa", "bf16"), (64, "llama.cpp", "f16"), (64, "llama.cpp", "q8_0")]
    peer = rows[2]
    assert peer["chunk_s"] == 2.0 and peer["tokens_per_s"] == 8.0 and peer["type_k"] == "q8_0"  # the median run
    assert peer["vs_first"] == pytest.approx(8.0 / rows[0]["tokens_per_s"])
    gguf = tmp_path / "model" / "model.gguf"
    calls = (bin_dir / "calls.txt").read_text().splitlines()
    assert calls[0].split() == ["-m", str(gguf), "-p", "16", "-n", "0", "-d", "0", "-b", "16", "-ub", "16", "-r", "3",
                                "-t", str(torch.get_num_threads()), "-o", "json"]
    assert calls[3].split()[-6:] == ["-ctk", "q8_0", "-ctv", "q8_0", "-fa", "1"] and "-d 64" in calls[3]
    assert len(tiny_loader) == 1 and tiny_loader[0]["quantized"]


def test_prefill_depth_reports_a_failed_peer_row_and_goes_on(tiny_loader: list[dict[str, object]], tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    bin_dir = fake_llama_bench(tmp_path, monkeypatch)
    (bin_dir / "llama-bench").write_text("#!/bin/bash\necho 'no model' >&2\nexit 3\n")
    out = tmp_path / "out.json"
    prefill_depth.main(["--model", "tiny", "--depths", "0", "--chunk", "16", "--kv-dtypes", "bf16",
                        "--peer-caches", "q8_0", "--out", str(out)])
    ours, peer = json.loads(out.read_text())["rows"]
    assert ours["tokens_per_s"] > 0 and peer["tokens_per_s"] is None and "failed (3)" in peer["error"]


def test_prefill_depth_arguments(tiny_loader: list[dict[str, object]], monkeypatch: pytest.MonkeyPatch) -> None:
    for bad in (["--kv-dtypes", "fp8"], ["--kv-dtypes", "bf16,bf16"], ["--kv-dtypes", ""], ["--depths", "0,x"],
                ["--depths", "-1"], ["--chunk", "0"], ["--peer-caches", "q4_0"]):
        with pytest.raises(SystemExit):
            prefill_depth.parse_args(bad)
    # q8 needs a loader that takes kv_dtype: the test's loader does not, so it is refused before any load
    with pytest.raises(SystemExit):
        prefill_depth.parse_args(["--kv-dtypes", "bf16,q8"])
    assert not tiny_loader

    def load_with_kv(name, directory, dtype, device, quantized=False, kv_dtype=None):  # type: ignore[no-untyped-def]
        return None

    monkeypatch.setattr(prefill_depth, "load_model", load_with_kv)
    args = prefill_depth.parse_args(["--kv-dtypes", "q8,bf16", "--depths", "16384,0"])
    assert args.kv_dtypes == ["q8", "bf16"] and args.depths == [16384, 0]


def test_kv_forms() -> None:
    assert parse_kv_dtypes(" bf16, q8 ") == ["bf16", "q8"]
    for bad in ("", "int4", "q8,q8"):
        with pytest.raises(ValueError):
            parse_kv_dtypes(bad)

    def old(name, directory, dtype, device, quantized=False):  # type: ignore[no-untyped-def]
        pass

    def new(name, directory, dtype, device, quantized=False, kv_dtype=None):  # type: ignore[no-untyped-def]
        pass

    assert load_options("bf16", old) == {} and load_options("bf16", new) == {}
    assert load_options("q8", new) == {"kv_dtype": torch.uint8}
    with pytest.raises(ValueError, match="takes no kv_dtype"):
        load_options("q8", old)


def test_filled_cache_holds_the_models_own_slots_up_to_its_length() -> None:
    model = tiny_model(1).model
    length = SEED_SLOTS * 2 + 40
    cache = filled_cache(model, length, length + 8)
    assert cache.length == cache.next_position == length and cache.capacity == length + 8
    reference = model.new_cache(SEED_SLOTS)
    model.forward(torch.randint(model.args.vocab_size, (SEED_SLOTS,), generator=torch.Generator().manual_seed(0)),
                  reference)
    for store, written in ((cache.keys, reference.keys), (cache.values, reference.values)):
        for layer, seed in zip(store, written, strict=True):
            tiled = seed[:, :SEED_SLOTS].repeat(1, 3, 1)[:, :length]
            assert torch.equal(layer[:, :length], tiled)
    assert filled_cache(model, 0, 4).length == 0
    with pytest.raises(ValueError):
        filled_cache(model, 5, 4)


def test_verify_over_decode_reads_a_cache_of_written_slots(monkeypatch: pytest.MonkeyPatch) -> None:
    """Never-written cache pages all map one zero page, which makes reading them look cheap: the
    timed passes must run over slots the model wrote."""
    model = tiny_model(1).model
    context, seen = SEED_SLOTS + 100, []
    real_forward = model.forward

    def forward(tokens, cache, all_logits=False):  # type: ignore[no-untyped-def]
        if cache.length == context:  # a timed pass (not the one that fills the cache)
            seen.append(cache.keys[0][:, :context].clone())
        return real_forward(tokens, cache, all_logits=all_logits)

    monkeypatch.setattr(model, "forward", forward)
    assert list(verify_over_decode({"bf16": model}, context, gamma=2, repeats=1)) == ["bf16"]
    expected = filled_cache(model, context, context).keys[0][:, :context]
    assert len(seen) == 4 and all(torch.equal(keys, expected) for keys in seen)  # warm-up pair, timed pair


def test_verify_over_decode_times_the_kv_forms_in_turn(monkeypatch: pytest.MonkeyPatch) -> None:
    """The forms' passes interleave, their order alternating per repeat: a slow spell lands on all alike."""
    models = {"bf16": tiny_model(1).model, "q8": tiny_model(1).model}
    context, calls = SEED_SLOTS + 10, []
    for form, model in models.items():
        real_forward = model.forward

        def forward(tokens, cache, all_logits=False, form=form, real=real_forward):  # type: ignore[no-untyped-def]
            if cache.length == context:
                calls.append((form, len(tokens)))
            return real(tokens, cache, all_logits=all_logits)

        monkeypatch.setattr(model, "forward", forward)
    timed = verify_over_decode(models, context, gamma=3, repeats=2)
    assert set(timed) == {"bf16", "q8"} and all(d > 0 and v > 0 for d, v in timed.values())
    warm = [("bf16", 1), ("bf16", 4), ("q8", 1), ("q8", 4)]
    assert calls == [*warm, *warm, ("q8", 1), ("q8", 4), ("bf16", 1), ("bf16", 4)]


def test_peer_command_lines_per_cache_type() -> None:
    peer = LlamaCpp(Path("/bin"), 4)
    model, draft, prompt = Path("t.gguf"), Path("d.gguf"), Path("p.txt")
    q8 = ["-ctk", "q8_0", "-ctv", "q8_0", "-fa", "1"]
    assert peer_name("llama.cpp draft", "f16") == "llama.cpp draft"
    assert peer_name("llama.cpp draft", "q8_0") == "llama.cpp draft q8_0"
    with pytest.raises(ValueError):
        peer_name("llama.cpp", "q4_0")
    plain = plain_decode_command(peer, model, prompt, 8, "f16")
    assert not set(q8) & set(plain) and plain_decode_command(peer, model, prompt, 8, "q8_0") == [*plain, *q8]
    spec = speculative_command(peer, model, draft, prompt, 8, 5, 100, "q8_0")
    assert spec[-10:] == [*q8, "-ctkd", "q8_0", "-ctvd", "q8_0"]
    assert speculative_command(peer, model, draft, prompt, 8, 5, 100, "f16") == spec[:-10]
    bench = llama_bench_command(peer, model, 1024, 16384, "q8_0", 2)
    assert bench[0] == os.path.join("/bin", "llama-bench") and bench[-6:] == q8


def test_parse_llama_bench() -> None:
    good = json.dumps([{"n_prompt": 8, "n_depth": 4, "samples_ns": [4e9, 1e9], "type_k": "f16", "type_v": "f16",
                        "flash_attn": -1}])
    assert parse_llama_bench(good, 8, 4) == {"chunk_s": 2.5, "tokens_per_s": 3.2, "runs": 2, "type_k": "f16",
                                             "type_v": "f16", "flash_attn": -1}
    for text, chunk, depth in (("llama-bench: error", 8, 4), (good, 8, 5), (good, 16, 4), ("[]", 8, 4)):
        with pytest.raises(RuntimeError):
            parse_llama_bench(text, chunk, depth)


def test_decode_bench_runs_every_method_per_kv_form(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Two engines stand for two KV forms (both hold bf16 here: the names are what is under test).
    engines = {"bf16": tiny_engine(tmp_path / "a", DECODING), "q8": tiny_engine(tmp_path / "b", DECODING)}
    args = Namespace(runs=1, gamma=DECODING.gamma, no_hf=True, hf_contexts="", peer=None, peer_contexts="",
                     peers="", peer_caches="f16,q8_0", new_tokens=DECODING.max_new_tokens, hf_runs=1)
    entry = bench_context(engines, 600, "What does read.fwf read?", DECODING, ["lc", "rapid"], args, 10.0, tmp_path)
    assert list(entry["kv_forms"]) == ["bf16", "q8"]
    for form in entry["kv_forms"].values():
        assert list(form["methods"]) == ["lc", "rapid"] and form["methods"]["rapid"]["same_tokens_as_lc"]
        assert form["verify_over_decode"] == form["verify_pass_s"] / form["decode_step_s"]
        assert form["lc_same_as_first_form"]
    assert entry["context_tokens"] > 0 and entry["peers"] == {} and entry["hf"] == {}
    out = capsys.readouterr().out
    assert "KV bf16:" in out and "KV q8:" in out
    assert f"verify({DECODING.gamma + 1})/decode per KV form: bf16 " in out and ", q8 " in out


def test_decode_bench_runs_the_kv_forms_in_turn(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each run of a method goes to every form, their order alternating: a slow spell of the host
    lands on both forms' rows alike."""
    engines = {"bf16": tiny_engine(tmp_path / "a", DECODING), "q8": tiny_engine(tmp_path / "b", DECODING)}
    indexes = {form: build_index(engine, 600, tmp_path / form) for form, engine in engines.items()}
    calls, real = [], bench_decode.answer_once

    def answer_once(engine, question, index, settings):  # type: ignore[no-untyped-def]
        calls.append((next(f for f, e in engines.items() if e is engine), settings.method))
        return real(engine, question, index, settings)

    monkeypatch.setattr(bench_decode, "answer_once", answer_once)
    per_form = bench_decode.bench_methods(engines, indexes, "What does read.fwf read?", DECODING, ["lc", "rapid"], 3)
    assert calls == [("bf16", "lc"), ("q8", "lc"), ("q8", "lc"), ("bf16", "lc"), ("bf16", "lc"), ("q8", "lc"),
                     ("bf16", "rapid"), ("q8", "rapid"), ("q8", "rapid"), ("bf16", "rapid"), ("bf16", "rapid"),
                     ("q8", "rapid")]
    for rows, lc in per_form.values():
        assert list(rows) == ["lc", "rapid"] and rows["rapid"]["same_tokens_as_lc"] and lc.token_ids


def test_decode_kv_form_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = Settings()
    assert kv_form_settings(settings, "") == {str(getattr(settings, "kv_dtype", "bf16")): settings}
    with pytest.raises(ValueError):
        kv_form_settings(settings, "bf16,fp8")
    # a checkout without Settings.kv_dtype: bf16 is what it stores; q8 is refused
    monkeypatch.setattr(kv_forms, "settings_take_kv_dtype", lambda: False)
    assert kv_form_settings(settings, "bf16") == {"bf16": settings}
    with pytest.raises(ValueError, match="no kv_dtype"):
        kv_form_settings(settings, "bf16,q8")

    @dataclasses.dataclass(frozen=True)
    class WithKv:
        kv_dtype: str = "auto"

    monkeypatch.setattr(kv_forms, "settings_take_kv_dtype", lambda: True)
    assert settings_for(WithKv(), "q8") == WithKv("q8")  # type: ignore[arg-type]


def test_kv_bytes_per_token_counts_the_cache_as_stored() -> None:
    for dtype in (torch.float32, torch.bfloat16):
        model = tiny_model(1, dtype=dtype).model
        a = model.args
        assert kv_bytes_per_token(model) == 2 * a.n_layers * a.n_kv_heads * a.head_dim * dtype.itemsize


def test_kv_bytes_per_token_of_the_8bit_cache() -> None:
    model = tiny_model(1, dtype=torch.bfloat16).model
    if not hasattr(model, "kv_dtype"):
        pytest.skip("this checkout has no 8-bit KV cache (Transformer.kv_dtype)")
    model.kv_dtype = torch.uint8
    a = model.args
    # per token, layer and K/V head: head_dim int8 values and a bf16 scale per 32 of them
    assert kv_bytes_per_token(model) == 2 * a.n_layers * a.n_kv_heads * (a.head_dim + a.head_dim // 16)


def test_prefill_depth_says_why_llama_cpp_rows_are_missing(tiny_loader: list[dict[str, object]], tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("RAPIDQA_LLAMA_CPP_BIN", str(tmp_path / "empty"))
    prefill_depth.main(["--model", "tiny", "--depths", "0", "--chunk", "16", "--kv-dtypes", "bf16",
                        "--out", str(tmp_path / "out.json")])
    assert f"llama.cpp rows left out: no llama-bench in {tmp_path / 'empty'}" in capsys.readouterr().out
