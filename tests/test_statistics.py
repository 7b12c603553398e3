"""Statistics that measure what they say (#28.4): the LC reference per engine, the live panel, the CLI's waits."""

from __future__ import annotations

from pathlib import Path

from app.events import Done
from app.report import done_record, stats_lines
from app.speedup import LcReference, Speedup
from decoding.stats import Stats
from ui.render import stats_markdown

DENSE = {"engine": "dense bfloat16 weights, cpu", "linear_kernel": "torch", "attention_kernel": "C attention kernel",
         "threads": "8", "warning": ""}
QUANT = DENSE | {"engine": "quantized weights, bfloat16 activations, cpu",
                 "linear_kernel": "C quant kernel (AVX512-VNNI)"}


def _stats(method: str, engine: dict[str, str], tokens_per_s: float, **more: object) -> Stats:
    # 11 tokens: 10 after the first, in 10 / tokens_per_s seconds
    return Stats(method=method, context_tokens=4000, generated=11, decode_s=10 / tokens_per_s, engine=engine,
                 target_passes=11, accepted_lengths=[1] * 11, **more)


def test_the_lc_reference_is_kept_per_engine_and_named_in_the_label(tmp_path: Path) -> None:
    reference = LcReference(tmp_path / "lc_reference.json")
    reference.record("target", _stats("lc", DENSE, 2.0))
    # A RAPID run on the quantized engine has no LC reference: the dense LC run is another engine.
    assert reference.speedup("target", _stats("rapid", QUANT, 8.0)).value is None
    reference.record("target", _stats("lc", QUANT, 4.0))
    on_quant = reference.speedup("target", _stats("rapid", QUANT, 8.0))
    assert on_quant.value == 2.0 and "C quant kernel (AVX512-VNNI)" in on_quant.label and "8 threads" in on_quant.label
    on_dense = LcReference(tmp_path / "lc_reference.json").speedup("target", _stats("rapid", DENSE, 8.0))  # from disk
    assert on_dense.value == 4.0 and "dense bfloat16" in on_dense.label
    fewer_threads = reference.speedup("target", _stats("rapid", QUANT | {"threads": "2"}, 8.0))
    assert fewer_threads.value is None


def test_the_live_panel_shows_the_running_time_not_zero() -> None:
    live = stats_markdown("Generating…", _stats("rapid", QUANT, 8.0), Speedup(None, "n/a"), elapsed_s=3.25)
    assert "| Answer end to end | running, 3.2 s so far |" in live and "0.00 s" not in live.split("end to end")[1][:20]
    done = stats_markdown("Answer complete", _stats("rapid", QUANT, 8.0, answer_s=4.5), Speedup(None, "n/a"))
    assert "| Answer end to end | 4.50 s |" in done
    assert "| Engine | quantized weights" in done and "Slow engine" not in done


def test_the_panel_says_a_slow_engine_first() -> None:
    slow = QUANT | {"linear_kernel": "torch (weights dequantized per call)",
                    "warning": "no native quant kernel (no C compiler?): install gcc"}
    text = stats_markdown("Generating…", _stats("rapid", slow, 1.0), Speedup(None, "n/a"), elapsed_s=1.0)
    assert text.startswith("> ⚠️ **Slow engine:** no native quant kernel")


def test_the_cli_shows_the_wait_before_the_first_token_and_the_engine() -> None:
    stats = _stats("rapid", QUANT, 8.0, first_token_s=0.4, question_to_first_s=31.0, wait_s=30.2, answer_s=33.0)
    lines = stats_lines(Done("answer", stats, [], Speedup(None, "n/a")))
    first = next(line for line in lines if line.startswith("first token after"))
    assert first.startswith("first token after 31.00 s from the question (of which 30.20 s reading the documents")
    assert any(line.startswith("engine: quantized weights") and "8 threads" in line for line in lines)
    assert not any(line.startswith("WARNING") for line in lines)
    warned = _stats("rapid", QUANT | {"warning": "install gcc"}, 8.0)
    assert "WARNING: install gcc" in stats_lines(Done("answer", warned, [], Speedup(None, "n/a")))


def test_a_cold_document_prefill_is_recorded_as_the_wait(tmp_path: Path) -> None:
    from app.pipeline import answer_once
    from tests.retrieval_fixtures import write
    from tests.test_windows_engine import DECODING, QUESTIONS, TOPICS, make_engine

    engine = make_engine(tmp_path / "home")
    index = engine.open_index(tmp_path / "index")
    index.add_file(write(tmp_path / "orchid.txt", TOPICS["orchid.txt"]))  # no prepare: the question reads it
    cold = answer_once(engine, QUESTIONS["orchid.txt"], index, DECODING)
    assert 0 < cold.stats.wait_s < cold.stats.question_to_first_s
    assert cold.stats.prefix_cached_tokens > 0  # read just before generation, then restored from the cache
    warm = answer_once(engine, QUESTIONS["orchid.txt"], index, DECODING)
    assert warm.stats.wait_s < cold.stats.wait_s
    assert warm.stats.engine == cold.stats.engine and set(warm.stats.engine) == {
        "engine", "linear_kernel", "attention_kernel", "kv_cache", "threads", "warning"}
    assert done_record(warm)["stats"]["engine"] == warm.stats.engine  # `ask --json` and the /ask API
    index.close()
