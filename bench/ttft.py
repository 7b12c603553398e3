"""Time to first token with the target's prefix cache: first question, follow-up, cold and after a restart.

    python -m bench.ttft [--tokens 16384] [--methods lc,rapid] [--fast]

On a real corpus of about --tokens tokens (a slice of data/R-data.pdf indexed with the real
retriever), for each method: a start answers a first question and a follow-up; then a new
Engine over the same cache directory (what a restart sees: nothing in memory, the prefix on
disk) answers both again. The first method starts cold (empty prefix cache); later ones find
the prefix on disk unless --cold-every-method (every method's first token needs only the
target's prefill, so a cold start is the same work for each). TTFT runs from calling Engine.answer (retrieval
included) to the first streamed answer token. Models are loaded before the clock starts.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import statistics
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path

from app.config import Settings
from app.events import Done, Event, Token
from app.machine import machine_summary
from app.options import add_model_options, settings_from_args
from app.pipeline import Engine
from app.reexports import METHODS, DecodingSettings
from bench.decode import REPO, document_slice

QUESTIONS = (
    "Which R function reads files in fixed width format?",
    "What does the widths argument of read.fwf give?",
)


def first_token_and_done(events: Iterable[Event], started: float) -> tuple[float | None, Done | None]:
    """Consume an answer's events: seconds from `started` to its first Token (the first text a user
    sees; None without one), and its Done event (None if the stream ended without one)."""
    first_token_s: float | None = None
    done: Done | None = None
    for event in events:
        if isinstance(event, Token) and first_token_s is None:
            first_token_s = time.perf_counter() - started
        elif isinstance(event, Done):
            done = event
    return first_token_s, done


def timed_answer(engine: Engine, question: str, index_dir: Path, decoding: DecodingSettings) -> dict[str, object]:
    index = engine.open_index(index_dir)
    started = time.perf_counter()
    first_token_s, done = first_token_and_done(engine.answer(question, index, decoding), started)
    assert done is not None
    s = done.stats
    return {
        "ttft_s": first_token_s,
        "total_s": time.perf_counter() - started,
        "prefix_cached_tokens": s.prefix_cached_tokens,
        "context_tokens": s.context_tokens,
        "draft_context_tokens": s.draft_context_tokens,
        "prefill_s": s.prefill_s,
        "decode_tokens_per_s": s.decode_tokens_per_s,
        "answer": done.answer,
    }


def bench_method(
    settings: Settings, method: str, index_dir: Path, cold: bool, log: bool
) -> dict[str, dict[str, object]]:
    if cold:
        shutil.rmtree(settings.kv_cache_dir, ignore_errors=True)  # nothing cached anywhere
    decoding = replace(settings.decoding, method=method)
    results: dict[str, dict[str, object]] = {}
    # Without a cold start the first Engine already finds the prefix on disk: that is a restart.
    for phase in ("cold", "after restart") if cold else ("after restart",):
        engine = Engine(settings, log=print if log else lambda _: None)
        if METHODS[method].runs_drafter_model:
            engine.model(settings.models.drafter)  # loading is not part of TTFT
        for label, question in zip(("first question", "follow-up"), QUESTIONS, strict=True):
            row = timed_answer(engine, question, index_dir, decoding)
            results[f"{phase}, {label}"] = row
            print(f"{method:6s} {phase:14s} {label:15s} TTFT {row['ttft_s']:7.2f} s  "
                  f"(prefix cached: {row['prefix_cached_tokens']} of {row['context_tokens']} tokens, "
                  f"prefill {row['prefill_s']:.2f} s)", flush=True)
        del engine
        gc.collect()
    return results


def run(argv: Sequence[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(prog="python -m bench.ttft", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=16384, help="corpus size in target tokens")
    parser.add_argument("--methods", default="lc,rapid")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--cold-every-method", action="store_true",
                        help="empty the prefix cache before every method, not only the first")
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--out", type=Path, default=REPO / "artifacts" / "bench_ttft.json")
    add_model_options(parser)
    args = parser.parse_args(argv)
    settings = settings_from_args(args)
    with tempfile.TemporaryDirectory() as tmp:
        settings = replace(settings, home=Path(tmp),
                           decoding=replace(settings.decoding, max_new_tokens=args.max_new_tokens))
        setup = Engine(settings, log=lambda _: None)
        index_dir = Path(tmp) / "index"
        setup.open_index(index_dir).add_files([document_slice(setup, args.tokens, Path(tmp))], progress=False)
        bytes_per_1k = setup.prefix_cache.bytes_per_1k_tokens(setup.target.model)
        machine = machine_summary(str(setup.device))
        del setup
        report: dict[str, object] = {"machine": machine, "target": settings.models.target,
                                     "drafter": settings.models.drafter, "tokens": args.tokens,
                                     "questions": list(QUESTIONS), "kv_bytes_per_1k_tokens": bytes_per_1k,
                                     "methods": {}}
        for number, method in enumerate(args.methods.split(",")):
            cold = number == 0 or args.cold_every_method
            report["methods"][method] = bench_method(settings, method, index_dir, cold, args.verbose)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(report, indent=2))
    print(f"\nKV prefix cache: {bytes_per_1k / 1e6:.1f} MB per 1K tokens; wrote {args.out}")
    follow_ups = [row["ttft_s"] for m in report["methods"].values() for k, row in m.items() if "follow-up" in k]
    if follow_ups:
        print(f"follow-up TTFT median {statistics.median(follow_ups):.2f} s over {len(follow_ups)} runs")
    return report


def main(argv: Sequence[str] | None = None) -> int:
    run(argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
