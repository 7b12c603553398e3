"""Serving benchmark: N users at once, each asking a different question over one document.

    python -m bench.serve [--users 1,2,4,8] [--methods lc,rapid] [--max-new-tokens 128] [--no-peer]

The questions are data/qa.jsonl's over data/R-data.pdf (read and indexed as `ask eval` does). After
a warm-up (both models loaded, the documents' prefix prefilled and held in memory, the drafter's
chunk KV built, one short answer per method), each method answers every question alone, one after
another (the reference: each answer's tokens and seconds), then for each N, N users start together
(a barrier), each a thread calling Engine.answer and timing its own events. Per N and method:
aggregate answer tokens/s (all users' answer tokens over the round's wall seconds), per-user
p50/p95 time to first token and answer seconds, the same questions' answer seconds alone, whether
every answer's tokens equal that question's solo answer, and the process's peak resident memory
over the round. In the same run, llama.cpp's server (`llama-server -np N`, built by `make peers`)
answers the same prompt tokens with the same metrics (bench.serve_peer). Greedy throughout.
Writes bench/results/serve-<time>.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch

from app.errors import CliError
from app.eval.runner import check_sources, load_questions
from app.eval.types import QAItem
from app.machine import machine_info
from app.options import add_model_options, index_dir_for, ingest_documents, log, settings_from_args
from app.pipeline import Engine, answer_once
from app.reexports import BASELINE, METHODS, DecodingSettings, Drafting, HybridIndex, engine_description
from bench.rss import PeakRss
from bench.serve_metrics import UserResult, markdown_table, round_row
from bench.serve_peer import PeerMissing, find_llama_server, peer_rows
from bench.serve_round import engine_user, run_round

REPO = Path(__file__).resolve().parent.parent
DOCUMENT = REPO / "data" / "R-data.pdf"
QUESTIONS = REPO / "data" / "qa.jsonl"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--users", default="1,2,4,8", help="concurrent users per round")
    p.add_argument("--methods", default=f"{BASELINE},{DecodingSettings().method}",
                   help="methods answering (default LC and the default method)")
    p.add_argument("--max-new-tokens", type=int, default=DecodingSettings().max_new_tokens,
                   help="answer length limit, the same for every engine")
    p.add_argument("--docs", type=Path, default=DOCUMENT, help="the document every question is about")
    p.add_argument("--questions", type=Path, default=QUESTIONS, help="the questions (ask eval's format)")
    p.add_argument("--index", type=Path, help="index directory (default: the one `ask eval --docs` keeps)")
    p.add_argument("--no-peer", action="store_true", help="skip llama.cpp's server")
    p.add_argument("--peer-threads", type=int, default=torch.get_num_threads(),
                   help="llama-server's -t and -tb (default: torch's threads, the engine's own)")
    p.add_argument("--peer-args", default="", help="extra llama-server options, e.g. '--cache-ram 0'")
    p.add_argument("--out", type=Path, help="JSON results (default bench/results/serve-<time>.json)")
    add_model_options(p)
    return p


def user_counts(text: str) -> list[int]:
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise CliError(f"--users takes numbers separated by commas, not {text!r}") from None
    if not counts or min(counts) < 1:
        raise CliError(f"--users needs at least one count, each at least 1 (got {text!r})")
    return counts


def document_questions(path: Path, document: Path, count: int) -> list[QAItem]:
    """`count` different questions about `document` (an item without a source is about the one
    document its file covers), spread evenly over the file so they read different parts of it."""
    items = [item for item in load_questions(path) if item.source in (None, document.name)]
    if len(items) < count:
        raise CliError(f"{count} users need {count} different questions; {path} has {len(items)} "
                       f"about {document.name}")
    step = len(items) / count
    return [items[int(i * step)] for i in range(count)]


def warm_up(engine: Engine, index: HybridIndex, question: str, runs: Sequence[DecodingSettings]) -> float:
    """What a running server has done before its users arrive: models loaded, the documents' prefix
    prefilled and held in memory, the drafters' chunk KV built, one short answer per method. Seconds."""
    started = time.perf_counter()
    for decoding in runs:
        if METHODS[decoding.method].drafts_with_model:
            engine.model(engine.drafter_spec(decoding.method))
    engine.prepare(index, progress=True)
    engine.keep_windows_in_memory(index)
    if engine.settings.drafter_chunk_kv:
        for spec in dict.fromkeys(engine.drafter_spec(d.method) for d in runs
                                  if METHODS[d.method].drafting is Drafting.RAG_MODEL):
            engine.build_drafter_kv(index, progress=True, spec=spec)
    for decoding in runs:
        answer_once(engine, question, index, replace(decoding, max_new_tokens=2))
    return time.perf_counter() - started


def engine_rows(engine: Engine, index: HybridIndex, items: Sequence[QAItem], decoding: DecodingSettings,
                counts: Sequence[int]) -> tuple[list[dict[str, object]], dict[str, UserResult]]:
    """One method: every question alone (the reference), then a round per user count."""
    name = f"rapidqa {decoding.method}"
    log(f"[{name}: the {len(items)} questions alone]")
    solo = {item.id: run_round([engine_user(engine, index, item.id, item.question, decoding)])[0] for item in items}
    rows = []
    for count in counts:
        log(f"[{name}: {count} user(s) at once]")
        users = [engine_user(engine, index, item.id, item.question, decoding) for item in items[:count]]
        with PeakRss() as peak:
            results = run_round(users)
        rows.append(round_row(name, results, solo, peak.gb))
    return rows, solo


def peer_prompts(engine: Engine, index: HybridIndex, items: Sequence[QAItem],
                 lc: DecodingSettings) -> tuple[list[tuple[str, list[int]]], list[int]]:
    """Our LC's long prompt tokens per question, and the document prefix they all start with."""
    prefix_prompt = engine.document_prompt(index)
    if prefix_prompt is None:
        raise CliError("the index holds no documents")
    prompts = [(item.id, engine.prompts(item.question, index, lc)[1].tokens) for item in items]
    prefix = prefix_prompt.prefix
    if off := [q for q, tokens in prompts if tokens[: len(prefix)] != prefix]:
        raise CliError(f"the long prompts of {', '.join(off)} do not start with the document prefix "
                       "(a corpus larger than one window?): the peer's warmed slots would not apply")
    return prompts, prefix


def run(argv: Sequence[str] | None = None) -> dict[str, object]:
    args = parser().parse_args(argv)
    counts = user_counts(args.users)
    methods = [m for m in args.methods.split(",") if m]
    if unknown := [m for m in methods if m not in METHODS]:
        raise CliError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    if not args.docs.exists():
        raise CliError(f"no such document: {args.docs}")
    settings = settings_from_args(args)
    # Checked before the long warm-up: a missing peer is a message now, not a surprise an hour later.
    server = None if args.no_peer else find_llama_server(settings.home)
    base = replace(settings.decoding, temperature=0.0, max_new_tokens=args.max_new_tokens)
    runs = [replace(base, method=m) for m in methods]
    items = document_questions(args.questions, args.docs, max(counts))

    engine = Engine(settings, log=log)
    index = engine.open_index(index_dir_for(argparse.Namespace(index=args.index, docs=[args.docs]), settings))
    ingest_documents(index, [args.docs], progress=False)
    check_sources(items, [doc.source for doc in index.documents()])
    log("[warm-up: models, the documents' prefix, chunk KV, one answer per method]")
    report: dict[str, object] = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": ["python", "-m", "bench.serve", *(argv if argv is not None else sys.argv[1:])],
        "machine": machine_info(str(engine.device), str(engine.target.model.dtype).removeprefix("torch.")),
        "engine": engine_description(engine.target),
        "load_average_at_start": os.getloadavg(),
        "questions": [item.id for item in items],
        "max_new_tokens": args.max_new_tokens,
        "warm_up_s": warm_up(engine, index, items[0].question, runs),
    }
    rows: list[dict[str, object]] = []
    alone: dict[str, object] = {}
    for decoding in runs:
        method_rows, solo = engine_rows(engine, index, items, decoding, counts)
        rows += method_rows
        alone[decoding.method] = {q: {"answer_s": r.answer_s, "first_token_s": r.first_token_s,
                                      "tokens": len(r.tokens)} for q, r in solo.items()}
    report.update(rows=rows, solo=alone)
    out = args.out or REPO / "bench" / "results" / f"serve-{time.strftime('%Y%m%d-%H%M%S')}.json"
    if server is not None:
        write(report, out)  # the engine's rows are kept whatever happens to the peer
        try:
            report["peer"] = run_peer(engine, index, items, base, server, counts, args, rows)
        except RuntimeError as error:
            report["peer"] = {"error": str(error)}
            log(f"llama.cpp server failed: {error}")
    report["load_average_at_end"] = os.getloadavg()
    write(report, out)
    print(markdown_table(rows))
    print(f"\nwrote {out}")
    return report


def run_peer(engine: Engine, index: HybridIndex, items: Sequence[QAItem], base: DecodingSettings, server: Path,
             counts: Sequence[int], args: argparse.Namespace, rows: list[dict[str, object]]) -> dict[str, object]:
    """The llama.cpp server's rows (added to rows) on our LC's prompts; returns what ran."""
    prompts, prefix = peer_prompts(engine, index, items, replace(base, method=BASELINE))
    gguf = engine.target.directory / "model.gguf" if engine.target.directory else None
    if gguf is None or not gguf.exists():
        raise CliError(f"the target {engine.settings.models.target} was not loaded from a GGUF file: llama.cpp "
                       "has nothing to read (pass --no-peer)")
    peer, ran = peer_rows(server, gguf, prompts, prefix, counts, args.max_new_tokens, args.peer_threads,
                          shlex.split(args.peer_args), log)
    rows += peer
    return {**ran, "gguf": str(gguf), "threads": args.peer_threads,
            "prompt_tokens": {q: len(t) for q, t in prompts}, "prefix_tokens": len(prefix)}


def write(report: dict[str, object], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))


def main(argv: Sequence[str] | None = None) -> int:
    try:
        run(argv)
    except (CliError, PeerMissing) as error:
        print(f"bench.serve: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
