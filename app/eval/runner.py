"""`ask eval`: answer quality and decoding speed of every method on a QA set, measured in one run.

Every method answers every question greedily over the same index. LC runs first on each question:
it fills the target's document-prefix cache that the other methods then reuse, and its decode
speed on that very question is the denominator of each method's speedup (the median over
questions is reported, so one noisy question on a shared CPU does not decide the figure).
Outputs: a table on the terminal (and table.txt), results.json, quality_vs_speedup.png.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from app.answer_style import check_style
from app.config import Settings
from app.errors import CliError
from app.eval.exactness import exactness_row
from app.eval.reporting import figure, report, write_json, write_report
from app.eval.scoring import context_summary, score_row, summarize
from app.eval.types import MethodRun, QAItem
from app.events import Done
from app.machine import machine_info
from app.options import (
    add_model_options,
    add_rag_read_option,
    check_document_args,
    index_dir_for,
    ingest_documents,
    log,
    settings_from_args,
)
from app.pipeline import Engine, answer_once
from decoding.engine_info import engine_description
from decoding.methods import BASELINE, METHODS
from decoding.settings import DecodingSettings
from retrieval.index import HybridIndex

DEFAULT_METHODS = "lc,rag,sd,magicdec,rapid"
SPLITS = ("tune", "report")


def load_questions(path: Path) -> list[QAItem]:
    items: list[QAItem] = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as error:
        raise CliError(f"cannot read the questions file {path}: {error.strerror or error}") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
            item = QAItem(
                id=str(data.get("id", f"q{number}")),
                question=str(data["question"]),
                answers=[str(a) for a in data["answers"]],
                page=data.get("page"),
                position=data.get("position"),
                source=data.get("source"),
                section=data.get("section"),
                hops=data.get("hops"),
                split=data.get("split"),
            )
        except (ValueError, KeyError, TypeError) as error:
            raise CliError(f"{path}, line {number}: not a question record ({error})") from None
        if not item.answers or not item.question.strip():
            raise CliError(f"{path}, line {number}: needs a question and at least one answer")
        items.append(item)
    if not items:
        raise CliError(f"{path} holds no questions")
    return items


def select_split(items: list[QAItem], split: str | None, path: Path) -> list[QAItem]:
    """The questions of one half; every question must say its half, or none is chosen by accident."""
    if split is None:
        return items
    unlabelled = [item.id for item in items if item.split is None]
    if unlabelled:
        raise CliError(f"--split {split}: {path} has questions without a \"split\" field "
                       f"({', '.join(unlabelled[:3])}{', ...' if len(unlabelled) > 3 else ''})")
    unknown = sorted({item.split for item in items} - set(SPLITS))
    if unknown:
        raise CliError(f"{path}: unknown split value(s) {', '.join(map(repr, unknown))}; "
                       f"expected {' or '.join(SPLITS)}")
    chosen = [item for item in items if item.split == split]
    if not chosen:
        raise CliError(f"--split {split}: {path} holds no {split} questions")
    return chosen


def check_sources(items: list[QAItem], documents: Sequence[str]) -> None:
    """A question labelled with a document that is not indexed cannot be answered from it: say so."""
    missing = sorted({item.source for item in items if item.source is not None} - set(documents))
    if missing:
        raise CliError(f"the questions refer to document(s) not in the index: {', '.join(missing)}; "
                       "pass them with --docs")


# ------------------------------------------------------------------------------------- method rows


ROW_OPTIONS = ("eta", "gamma", "budget", "style")


def parse_row(spec: str) -> tuple[str, dict[str, str]]:
    """"rapid-self:eta=2:style=lead" -> ("rapid-self", {"eta": "2", "style": "lead"}); method_runs checks the method."""
    method, *options = [part.strip() for part in spec.split(":")]
    values: dict[str, str] = {}
    for option in options:
        key, sep, value = option.partition("=")
        if not sep or key not in ROW_OPTIONS or not value:
            raise CliError(f"{spec!r}: a row's options are {', '.join(k + '=VALUE' for k in ROW_OPTIONS)} "
                           "after the method, each after a colon")
        values[key] = value
    return method, values


def method_runs(methods: Sequence[str], base: DecodingSettings, eta_sweep: Sequence[float] | None = None,
                gamma_sweep: Sequence[int] | None = None) -> list[MethodRun]:
    """LC first, then the rows in the order given. A row is a method, optionally with its own
    eta, gamma, passage budget or answer style ("rapid-self:eta=2:style=lead"); a rapid method
    without its own eta and gamma expands over the sweeps. "lc" with options is a row of its own:
    the first row, plain LC, stays every row's baseline."""
    unknown = [m for m in methods if m.split(":")[0].strip() not in METHODS]
    if unknown:
        raise CliError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    rows = [parse_row(spec) for spec in dict.fromkeys(methods)]
    swept = [method for method, options in rows if METHODS[method].eta_applies]
    if (eta_sweep or gamma_sweep) and not swept:
        raise CliError("--eta-sweep and --gamma-sweep vary rapid: add rapid to --methods")
    runs = [MethodRun(BASELINE, replace(base, method=BASELINE))]
    for method, options in rows:
        if method == BASELINE and not options:
            continue
        info = METHODS[method]
        for key, applies in (("eta", info.eta_applies), ("gamma", info.speculative)):
            if key in options and not applies:
                raise CliError(f"{method}: {key} does not apply to it")
        try:
            budget = int(options["budget"]) if "budget" in options else None  # tokens of passages
            style = options.get("style")
            if style is not None:
                check_style(style)
            etas = [float(options["eta"])] if "eta" in options else (eta_sweep or [base.eta])
            own_gamma = int(options["gamma"]) if "gamma" in options else None
        except ValueError as error:
            raise CliError(f"{method}: {error}") from None
        if budget is not None and budget < 1:
            raise CliError(f"{method}: budget must be at least 1 token")
        extra = [f"budget={budget}"] * (budget is not None) + [f"style={style}"] * (style is not None)
        if not info.eta_applies:
            # A row's own gamma is in its label: rows differing only in gamma are summarised apart.
            own = [f"gamma={own_gamma}"] * (own_gamma is not None) + extra
            label = f"{method}({','.join(own)})" if own else method
            decoding = replace(base, method=method, gamma=base.gamma if own_gamma is None else own_gamma)
            runs.append(MethodRun(label, decoding, budget, style))
            continue
        for eta in etas:
            for gamma in [own_gamma] if own_gamma is not None else (gamma_sweep or [base.gamma]):
                decoding = replace(base, method=method, eta=float(eta), gamma=int(gamma))
                parts = [f"eta={_number(eta)}", f"gamma={gamma}", *(["lookup"] * decoding.lookup_in_rapid), *extra]
                runs.append(MethodRun(f"{method}({','.join(parts)})", decoding, budget, style))
    for run in runs:
        run.decoding.validate()
    return runs


def _number(value: float) -> str:
    return f"{value:g}"


def _csv(kind: Callable[[str], Any]) -> Callable[[str], list[Any]]:
    def parse(text: str) -> list[Any]:
        try:
            return [kind(part) for part in text.split(",") if part.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None

    return parse


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ask eval",
        description="Quality (exact match, token F1, answer contained) and decode speed of every method "
        "on a QA set; LC runs first on each question and is the speedup baseline.",
    )
    p.add_argument("--docs", nargs="+", type=Path, metavar="PATH", help="documents or folders to index")
    p.add_argument("--index", type=Path, metavar="DIR",
                   help="index directory (default: one kept per --docs set)")
    p.add_argument("--questions", type=Path, metavar="JSONL",
                   help='one {"id", "question", "answers": [...], "page" or "section", "position", "source", '
                        '"split"} per line (required)')
    p.add_argument("--conversations", type=Path, metavar="JSONL",
                   help="evaluate follow-up questions instead (app/eval/conversations.py): recall@5 and answer "
                   "contains, standalone / rewritten / raw; one {id, history, question, standalone, answers, "
                   "page} per line")
    p.add_argument("--report", type=Path, metavar="RESULTS_JSON",
                   help="only re-draw the table and plot of a finished (or interrupted) run from its results.json")
    p.add_argument("--beside", type=Path, nargs="+", metavar="RESULTS_JSON",
                   help="with --report: other runs on the same questions (another target's, e.g. upward "
                        "speculation) join the table, paired against the first run's LC (written to --out)")
    p.add_argument("--methods", default=DEFAULT_METHODS, help=f"comma-separated rows (default {DEFAULT_METHODS}); "
                   "lc always runs, first. A row may set its own eta, gamma, passage budget (tokens) or answer "
                   "style (brief, lead) after colons: rapid-self:eta=2:budget=1024:style=lead")
    p.add_argument("--split", choices=SPLITS,
                   help="only the questions of this half of the set (their \"split\" field): "
                        "tune to choose settings on, report to report them on")
    p.add_argument("--limit", type=int, help="only the first N questions (after --split)")
    p.add_argument("--eta-sweep", type=_csv(float), metavar="E,E,...", help="rapid: one row per eta")
    p.add_argument("--gamma-sweep", type=_csv(int), metavar="G,G,...", help="rapid: one row per gamma")
    p.add_argument("--eta", type=float, help="rapid eta without a sweep (default 0)")
    p.add_argument("--gamma", type=int,
                   help="drafted tokens per target pass for sd, magicdec, lookup, rapid (default 5)")
    p.add_argument("--lookup", action="store_true",
                   help="rapid: try n-gram lookup drafts from the retrieved context first")
    p.add_argument("--drafter-prefills", action="store_true",
                   help="RAPID's drafter prefills its passages together instead of reading their per-chunk "
                        "KV: slower, measures what reading chunks apart costs in acceptance and quality")
    add_rag_read_option(p)
    p.add_argument("--max-new-tokens", type=int, default=48, help="answer length limit (default 48)")
    p.add_argument("--out", type=Path, metavar="DIR",
                   help="output folder (default $RAPIDQA_HOME/eval/TIMESTAMP)")
    p.add_argument("--no-warmup", action="store_true",
                   help="skip the untimed warm-up answer (it prefills the documents before any timing)")
    add_model_options(p)
    return p


def main(argv: Sequence[str]) -> int:
    args = parser().parse_args(argv)
    if args.report is not None:
        return report(args.report, args.beside or (), args.out)
    if args.beside:
        raise CliError("--beside joins finished runs: give it with --report")
    if args.conversations is not None:
        return conversations_main(args)
    if args.questions is None:
        raise CliError("--questions is required: a JSONL file of questions and acceptable answers")
    if args.limit is not None and args.limit < 1:
        raise CliError("--limit must be at least 1")
    check_document_args(args)
    settings = settings_from_args(args)
    # Greedy decoding makes every method's answer a deterministic function of its inputs.
    base = replace(settings.decoding, temperature=0.0)
    settings = replace(settings, decoding=base, drafter_chunk_kv=not args.drafter_prefills)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    runs = method_runs(methods, base, args.eta_sweep, args.gamma_sweep)
    items = select_split(load_questions(args.questions), args.split, args.questions)[: args.limit]
    index_dir = index_dir_for(args, settings)
    out = args.out or settings.home / "eval" / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)

    engine = Engine(settings, log=log)
    index = engine.open_index(index_dir)
    if args.docs:
        ingest_documents(index, args.docs, progress=False)
    documents = [doc.source for doc in index.documents()]
    if not documents:
        raise CliError(f"the index {index_dir} holds no documents: pass --docs")
    check_sources(items, documents)

    results = run_eval(engine, index, items, runs, settings, warmup=not args.no_warmup, out=out, log=log,
                       documents=documents, argv=list(argv))
    return write_report(results, out)


def conversations_main(args: argparse.Namespace) -> int:
    """`ask eval --conversations FILE`: the follow-up table (app.eval.conversations)."""
    from app.eval.conversations import load_conversations, run_conversations, table

    check_document_args(args)
    settings = settings_from_args(args)
    items = load_conversations(args.conversations)[: args.limit]
    out = args.out or settings.home / "eval" / time.strftime("conversations-%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    engine = Engine(settings, log=log)
    index = engine.open_index(index_dir_for(args, settings))
    if args.docs:
        ingest_documents(index, args.docs, progress=False)
    if not index.documents():
        raise CliError("the index holds no documents: pass --docs")
    results = run_conversations(engine, index, items, args.max_new_tokens, out, log)
    print(table(results))
    return 0


def evidence_row(item: QAItem, done: Done) -> dict:
    """Whether retrieval found the labelled page and whether the target read it (its window)."""
    labelled = item.page is not None or item.section is not None
    cited = [c for c in done.citations if item.source in (None, c.source)
             and (c.page == item.page if item.page is not None else c.section == item.section)]
    return {
        "source": item.source,
        "page_retrieved": bool(cited) if labelled else None,
        "page_read": any(c.read for c in cited) if labelled else None,
        "read": done.reading.label if done.reading else None,
        "retrieved_elsewhere": done.reading.elsewhere if done.reading else 0,
        "evidence_split": done.reading.split if done.reading else False,
    }


def run_eval(
    engine: Engine, index: HybridIndex, items: list[QAItem], runs: list[MethodRun], settings: Settings,
    warmup: bool, out: Path, log: Callable[[str], None], documents: list[str], argv: list[str],
) -> dict:
    uses_drafter = any(METHODS[r.decoding.method].runs_drafter_model for r in runs)
    results: dict = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": ["ask", "eval", *argv],
        "machine": machine_info(str(engine.device), str(engine.target.model.dtype).removeprefix("torch.")),
        # What ran (each row's stats carry it too): weights, kernels, threads and any slow-engine warning.
        "engine": engine_description(engine.target),
        "models": {"target": settings.models.target,
                   "drafter": settings.models.drafter if uses_drafter else None},
        "documents": documents,
        "decoding": asdict(settings.decoding),  # every knob, so a result can be reproduced
        "drafter_chunk_kv": settings.drafter_chunk_kv,
        "rag_read": settings.rag_read,
        "methods": [r.label for r in runs],
        "n_questions": len(items),
        "questions": [vars(item) for item in items],
        "warmup": None,
        "rows": [],
        "summary": [],
        "context": {"long_tokens": None, "draft_tokens": None},
        "complete": False,
    }
    if uses_drafter:
        engine.model(settings.models.drafter)  # load now, so loading never looks like a slow first answer
    if warmup:
        # Untimed: prefills the documents into the prefix cache and pays first-call costs, so that
        # question 1 is measured like every later one.
        log("[warm-up: reading the documents once]")
        started = time.perf_counter()
        # What ingest prepares (every window's prefill, the drafter's chunk KV) and the chunk KV of any
        # other model that reads the passages from it (the target in rapid-self and in rag), with
        # progress bars: minutes when cold.
        engine.prepare(index, progress=True)
        engine.keep_windows_in_memory(index)  # as the server does after an upload
        for spec in dict.fromkeys(engine.chunk_kv_reader(r.decoding.method) for r in runs):
            if spec is not None:
                engine.build_drafter_kv(index, progress=True, spec=spec)
        short = replace(settings.decoding, method=BASELINE, max_new_tokens=2)
        done = answer_once(engine, items[0].question, index, short)
        results["warmup"] = {"seconds": time.perf_counter() - started, "prefill_s": done.stats.prefill_s,
                             "context_tokens": done.stats.context_tokens,
                             "prefix_cached_tokens": done.stats.prefix_cached_tokens}
    rows: list[dict] = results["rows"]
    for number, item in enumerate(items, 1):
        lc_tokens_per_s: float | None = None
        lc_answer_s: float | None = None
        lc_tokens: dict[str | None, list[int]] = {}  # per answer style: what eta = 0 rows must equal
        for run in runs:
            # budget=N is the passages' budget itself, not a floor under the corpus's share.
            retrieval = (replace(settings.retrieval, budget_min_tokens=run.budget, budget_fraction=0.0)
                         if run.budget else None)
            done = answer_once(engine, item.question, index, run.decoding, retrieval=retrieval, style=run.style)
            if run is runs[0]:
                lc_tokens_per_s, lc_answer_s = done.stats.decode_tokens_per_s, done.stats.answer_s
            if run.decoding.method == BASELINE:
                lc_tokens.setdefault(run.style, done.token_ids)
            row = score_row(item, run, done.answer, done.stats, lc_tokens_per_s, lc_answer_s)
            row |= evidence_row(item, done)
            # Asked in another style, the question is another prompt: its reference is LC in that style.
            row |= exactness_row(run.decoding, done.token_ids, lc_tokens.get(run.style))
            rows.append(row)
            log(f"[{number}/{len(items)} {item.id}] {run.label}: "
                f"{figure(row['decode_tokens_per_s'], '.2f')} tok/s, "
                f"speedup {figure(row['speedup_vs_lc'], '.2f')}, "
                f"contains={'yes' if row['contains'] else 'no'}"
                f"{', DIFFERS FROM LC' if row['equals_lc'] is False else ''}: {' '.join(done.answer.split())[:80]!r}")
        results["summary"] = summarize(rows, results["methods"])
        results["context"] = context_summary(rows)
        write_json(results, out / "results.json")  # after every question: a long run keeps what it measured
    results["complete"] = True
    write_json(results, out / "results.json")
    return results
