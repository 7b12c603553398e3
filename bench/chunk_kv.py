"""Chunk KV for RAPID's drafter: what it costs at ingest and what it changes at question time.

    python -m bench.chunk_kv [--questions 6] [--max-new-tokens 64] [--workdir DIR]

Over data/R-data.pdf indexed with the real retriever: the drafter's chunk KV build against the
target's prefill of the same corpus (the long prompt's document prefix). Then, per question from
data/qa.jsonl, LC and RAPID (eta = 0) with the drafter prefilling its retrieved passages and with
it reading them from chunk KV, interleaved: acceptance, mean accepted length, the drafter's read
(from the first token until the drafter is ready) and whether each answer is LC's.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from app.chunk_kv import CHUNK_KV_DIR
from app.machine import machine_summary
from app.options import add_model_options, settings_from_args
from app.pipeline import Engine, answer_once
from app.reexports import DecodingSettings
from bench.decode import REPO

RESULTS = REPO / "bench" / "results" / "chunk_kv.json"


def ingest_costs(engine: Engine, index_dir: Path) -> dict[str, float | int]:
    index = engine.open_index(index_dir)
    index.add_files([REPO / "data" / "R-data.pdf"], progress=False)
    shutil.rmtree(index.directory / CHUNK_KV_DIR, ignore_errors=True)
    engine.model(engine.settings.models.drafter)  # loading is not part of the build
    started = time.perf_counter()
    encode_s = engine.build_drafter_kv(index, progress=False)
    build_wall_s = time.perf_counter() - started
    chunks = [c for doc in index.documents() for c in index.chunks(doc.doc_id)]
    prompt = engine.document_prompt(index)
    assert prompt is not None
    shutil.rmtree(engine.settings.kv_cache_dir, ignore_errors=True)
    target_prefill_s = engine.prefill_documents(index, progress=False)  # stored: the questions start from it
    return {
        "chunks": len(chunks),
        "chunk_tokens": sum(len(p.tokens) for p in engine.passages(chunks)),
        "drafter_build_s": build_wall_s,
        "drafter_encode_s": encode_s,
        "target_prefix_tokens": len(prompt.prefix),
        "target_prefill_s": target_prefill_s,
        "build_over_prefill": build_wall_s / target_prefill_s,
    }


def answer_row(engine: Engine, index_dir: Path, question: str, decoding: DecodingSettings) -> dict[str, object]:
    started = time.perf_counter()
    done = answer_once(engine, question, engine.open_index(index_dir), decoding)
    s = done.stats
    return {
        "answer": done.answer,
        "answer_wall_s": time.perf_counter() - started,
        "generated": s.generated,
        "drafted": s.drafted,
        "accepted": s.accepted,
        "target_passes": s.target_passes,
        "first_token_s": s.first_token_s,
        # prefill_s ends with the drafter's build, which starts right after the first token.
        "drafter_read_s": s.prefill_s - s.first_token_s if s.method == "rapid" else None,
        "decode_s": s.decode_s,
        "draft_context_tokens": s.draft_context_tokens,
    }


def summary(rows: list[dict[str, object]]) -> dict[str, float | None]:
    if not rows:
        return {}
    drafted = sum(int(r["drafted"]) for r in rows)
    reads = [float(r["drafter_read_s"]) for r in rows if r["drafter_read_s"] is not None]
    return {
        "acceptance": sum(int(r["accepted"]) for r in rows) / drafted if drafted else None,
        "tokens_per_pass": sum(int(r["generated"]) for r in rows) / sum(int(r["target_passes"]) for r in rows),
        "median_drafter_read_s": statistics.median(reads) if reads else None,
        "median_answer_wall_s": statistics.median(float(r["answer_wall_s"]) for r in rows),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.chunk_kv", description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=6)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--gamma", type=int, default=5)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/rapidqa-bench-chunk-kv"))
    parser.add_argument("--out", type=Path, default=RESULTS)
    add_model_options(parser)
    args = parser.parse_args(argv)
    settings = replace(settings_from_args(args), home=args.workdir / "home")
    engine = Engine(settings, log=lambda _: None)
    index_dir = args.workdir / "index"

    costs = ingest_costs(engine, index_dir)
    print(f"ingest: drafter chunk KV {costs['drafter_build_s']:.1f} s for {costs['chunks']} chunks "
          f"({costs['chunk_tokens']} tokens); target prefill of the {costs['target_prefix_tokens']}-token "
          f"document prefix {costs['target_prefill_s']:.1f} s; ratio {costs['build_over_prefill']:.2f}", flush=True)

    questions = [json.loads(line)["question"] for line in (REPO / "data" / "qa.jsonl").read_text().splitlines()]
    questions = questions[: args.questions]
    decoding = DecodingSettings(max_new_tokens=args.max_new_tokens, gamma=args.gamma, eta=0.0)
    runs: dict[str, list[dict[str, object]]] = {"lc": [], "rapid, drafter prefill": [], "rapid, chunk KV": []}
    for i, question in enumerate(questions):
        lc = answer_row(engine, index_dir, question, replace(decoding, method="lc"))
        runs["lc"].append(lc)
        modes = [False, True] if i % 2 == 0 else [True, False]  # interleaved: neither always runs first
        for chunk_kv in modes:
            engine.settings = replace(settings, drafter_chunk_kv=chunk_kv)
            row = answer_row(engine, index_dir, question, replace(decoding, method="rapid"))
            row["same_as_lc"] = row["answer"] == lc["answer"]
            runs["rapid, chunk KV" if chunk_kv else "rapid, drafter prefill"].append(row)
            print(f"q{i + 1} chunk_kv={chunk_kv!s:5s} drafted {row['drafted']:3d} accepted {row['accepted']:3d} "
                  f"drafter read {row['drafter_read_s']:.2f} s  same as LC {row['same_as_lc']}", flush=True)
    results = {"machine": machine_summary(str(engine.device)),
               "settings": {"max_new_tokens": args.max_new_tokens, "gamma": args.gamma,
                            "target": settings.models.target, "drafter": settings.models.drafter},
               "ingest": costs, "summary": {name: summary(rows) for name, rows in runs.items()}, "runs": runs}
    for name, values in results["summary"].items():
        print(f"{name:24s} " + "  ".join(f"{k} {v:.3f}" if v is not None else f"{k} n/a" for k, v in values.items()))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0 if all(r["same_as_lc"] for name, rows in runs.items() if name != "lc" for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
