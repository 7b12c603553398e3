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
import os
import platform
import re
import statistics
import string
import time
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.errors import CliError
from decoding.methods import METHODS
from decoding.settings import DecodingSettings

if TYPE_CHECKING:  # the scoring half of this module must import without torch
    from app.config import Settings
    from app.pipeline import Engine
    from decoding.stats import Stats
    from retrieval.index import HybridIndex

DEFAULT_METHODS = "lc,rag,sd,magicdec,rapid"
POSITIONS = ("beginning", "middle", "end")

# ----------------------------------------------------------------------------------------- scoring

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_ASCII_PUNCTUATION = frozenset(string.punctuation)


def normalize(text: str) -> str:
    """SQuAD-style: lowercase, drop punctuation and articles, collapse whitespace.

    Punctuation is deleted rather than turned into spaces, so "read.table" and "read table" stay
    different answers while "`read.table()`" and "read.table" become the same one.
    """
    text = unicodedata.normalize("NFKC", text).lower()
    text = "".join(
        ch for ch in text if ch not in _ASCII_PUNCTUATION and not unicodedata.category(ch).startswith("P")
    )
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, answers: Iterable[str]) -> bool:
    predicted = normalize(prediction)
    return any(predicted == normalize(answer) for answer in answers)


def token_f1(prediction: str, answers: Iterable[str]) -> float:
    """Best token-overlap F1 over the acceptable answers."""
    predicted = normalize(prediction).split()
    return max((_f1(predicted, normalize(answer).split()) for answer in answers), default=0.0)


def _f1(predicted: list[str], gold: list[str]) -> float:
    if not predicted or not gold:
        return float(predicted == gold)
    common = sum((Counter(predicted) & Counter(gold)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def contains_answer(prediction: str, answers: Iterable[str]) -> bool:
    """Some acceptable answer appears as whole tokens in the prediction.

    Token boundaries matter: "read.csv2" must not count as containing "read.csv", nor "12" as "2".
    """
    predicted = normalize(prediction).split()
    for answer in answers:
        gold = normalize(answer).split()
        if gold and any(predicted[i : i + len(gold)] == gold for i in range(len(predicted) - len(gold) + 1)):
            return True
    return False


def median_or_none(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def mean_or_none(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.fmean(present) if present else None


# --------------------------------------------------------------------------------------- questions


@dataclass(frozen=True)
class QAItem:
    id: str
    question: str
    answers: list[str]
    page: int | None = None
    position: str | None = None  # beginning | middle | end of the document


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
            )
        except (ValueError, KeyError, TypeError) as error:
            raise CliError(f"{path}, line {number}: not a question record ({error})") from None
        if not item.answers or not item.question.strip():
            raise CliError(f"{path}, line {number}: needs a question and at least one answer")
        items.append(item)
    if not items:
        raise CliError(f"{path} holds no questions")
    return items


# ------------------------------------------------------------------------------------- method rows


@dataclass(frozen=True)
class MethodRun:
    """One row of the result table: a method with its settings (a rapid sweep point is its own row)."""

    label: str
    decoding: DecodingSettings


def method_runs(methods: Sequence[str], base: DecodingSettings, eta_sweep: Sequence[float] | None = None,
                gamma_sweep: Sequence[int] | None = None) -> list[MethodRun]:
    """LC first, then the other methods in the order given; rapid expands over eta x gamma."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise CliError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    if (eta_sweep or gamma_sweep) and "rapid" not in methods:
        raise CliError("--eta-sweep and --gamma-sweep vary rapid: add rapid to --methods")
    runs = [MethodRun("lc", replace(base, method="lc"))]
    for method in dict.fromkeys(methods):
        if method == "lc":
            continue
        if method != "rapid":
            runs.append(MethodRun(method, replace(base, method=method)))
            continue
        for eta in eta_sweep or [base.eta]:
            for gamma in gamma_sweep or [base.gamma]:
                decoding = replace(base, method="rapid", eta=float(eta), gamma=int(gamma))
                suffix = ",lookup" if decoding.lookup_in_rapid else ""
                runs.append(MethodRun(f"rapid(eta={_number(eta)},gamma={gamma}{suffix})", decoding))
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


# ------------------------------------------------------------------------------------------ scoring rows


def score_row(item: QAItem, run: MethodRun, answer: str, stats: Stats, lc_tokens_per_s: float | None,
              lc_answer_s: float | None = None) -> dict:
    tokens_per_s = stats.decode_tokens_per_s
    speedup = tokens_per_s / lc_tokens_per_s if tokens_per_s and lc_tokens_per_s else None
    e2e_speedup = lc_answer_s / stats.answer_s if lc_answer_s and stats.answer_s else None
    record = stats.to_dict()
    record.pop("token_times", None)  # per-token timestamps would dominate the file
    return {
        "id": item.id,
        "question": item.question,
        "position": item.position,
        "page": item.page,
        "method": run.label,
        "base_method": run.decoding.method,
        "eta": run.decoding.eta if run.decoding.method == "rapid" else None,
        "gamma": run.decoding.gamma if run.decoding.method in ("sd", "magicdec", "rapid") else None,
        "answer": answer,
        "answers": item.answers,
        "exact_match": exact_match(answer, item.answers),
        "f1": token_f1(answer, item.answers),
        "contains": contains_answer(answer, item.answers),
        "decode_tokens_per_s": tokens_per_s,
        "acceptance_rate": stats.acceptance_rate,
        "mean_accepted_length": stats.mean_accepted_length,
        "prefill_s": stats.prefill_s,
        "decode_s": stats.decode_s,
        "generated": stats.generated,
        "context_tokens": stats.context_tokens,
        "draft_context_tokens": stats.draft_context_tokens,
        "speedup_vs_lc": speedup,
        "answer_s": stats.answer_s,
        "e2e_speedup_vs_lc": e2e_speedup,
        "stats": record,
    }


def summarize(rows: list[dict], labels: Sequence[str]) -> list[dict]:
    summary = []
    for label in labels:
        mine = [r for r in rows if r["method"] == label]
        if not mine:
            continue
        drafted = sum(r["stats"]["drafted"] for r in mine)
        passes = sum(r["stats"]["target_passes"] for r in mine)
        by_position = {}
        for position in POSITIONS:
            placed = [r for r in mine if r["position"] == position]
            by_position[position] = sum(r["contains"] for r in placed) / len(placed) if placed else None
        summary.append({
            "method": label,
            "n": len(mine),
            "exact_match": sum(r["exact_match"] for r in mine) / len(mine),
            "f1": statistics.fmean(r["f1"] for r in mine),
            "contains": sum(r["contains"] for r in mine) / len(mine),
            "contains_by_position": by_position,
            "decode_tokens_per_s": mean_or_none(r["decode_tokens_per_s"] for r in mine),
            # Pooled over questions: a 3-token answer should not weigh as much as a 48-token one.
            "acceptance_rate": sum(r["stats"]["accepted"] for r in mine) / drafted if drafted else None,
            # Stats' own definition: tokens per target pass, a closing stop token included.
            "mean_accepted_length": sum(sum(r["stats"]["accepted_lengths"]) for r in mine) / passes if passes else None,
            "prefill_s": statistics.fmean(r["prefill_s"] for r in mine),
            "decode_s": statistics.fmean(r["decode_s"] for r in mine),
            "generated": statistics.fmean(r["generated"] for r in mine),
            "median_speedup_vs_lc": median_or_none(r["speedup_vs_lc"] for r in mine),
            # End to end: question received -> last token, retrieval included (older results lack it).
            "median_answer_s": median_or_none(r.get("answer_s") for r in mine),
            "median_e2e_speedup_vs_lc": median_or_none(r.get("e2e_speedup_vs_lc") for r in mine),
        })
    return summary


# ---------------------------------------------------------------------------------------------- output


def machine_info(device: str, dtype: str) -> dict:
    return {
        "processor": gpu_name(device) or cpu_name(),
        "cores": os.cpu_count(),
        "torch_threads": _torch_threads(),
        "platform": platform.platform(),
        "device": device,
        "dtype": dtype,
    }


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def gpu_name(device: str) -> str | None:
    if not device.startswith("cuda"):
        return None
    import torch

    return f"{torch.cuda.get_device_name(torch.device(device))} (host {cpu_name()})"


def _torch_threads() -> int | None:
    try:
        import torch

        return torch.get_num_threads()
    except ImportError:
        return None


def _fmt(value: float | None, spec: str, missing: str = "n/a") -> str:
    return missing if value is None else format(value, spec)


def format_table(results: dict) -> str:
    machine, models, context = results["machine"], results["models"], results["context"]
    device = machine["device"] if machine["device"] != "cpu" else "CPU"
    header = [
        f"machine: {machine['processor']}, {machine['cores']} cores (torch threads "
        f"{machine['torch_threads']}), device {device}, {machine['dtype']}",
        f"models: target {models['target']}, drafter {models['drafter']}",
        f"documents: {', '.join(results['documents'])}; long context {context['long_tokens']} tokens "
        f"(median over questions), drafter context {context['draft_tokens']} tokens",
        f"questions: {results['n_questions']}, greedy, "
        f"max_new_tokens {results['decoding']['max_new_tokens']}; "
        f"speedup = median over questions of decode tok/s / LC decode tok/s on the same question; "
        f"answer s = median seconds from question to last token, e2e speedup = LC's over the method's",
    ]
    columns = ["method", "EM", "F1", "contains", "b/m/e", "tok/s", "accept", "MAL", "prefill s", "speedup",
               "answer s", "e2e speedup"]
    body = []
    for s in results["summary"]:
        positions = "/".join(_fmt(s["contains_by_position"][p], ".2f", "-") for p in POSITIONS)
        body.append([
            s["method"], f"{s['exact_match']:.2f}", f"{s['f1']:.2f}", f"{s['contains']:.2f}", positions,
            _fmt(s["decode_tokens_per_s"], ".2f"), _fmt(s["acceptance_rate"], ".1%"),
            _fmt(s["mean_accepted_length"], ".2f"), f"{s['prefill_s']:.2f}",
            _fmt(s["median_speedup_vs_lc"], ".2f") + ("x" if s["median_speedup_vs_lc"] is not None else ""),
            _fmt(s.get("median_answer_s"), ".2f"),
            _fmt(s.get("median_e2e_speedup_vs_lc"), ".2f") + ("x" if s.get("median_e2e_speedup_vs_lc") else ""),
        ])
    widths = [max(len(row[i]) for row in [columns, *body]) for i in range(len(columns))]

    def line(cells: list[str]) -> str:
        pairs = enumerate(zip(cells, widths, strict=True))
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in pairs)

    rule = "-" * len(line(columns))
    notes = ("EM/F1/contains: exact match, token F1, answer contained; b/m/e: contains rate for facts\n"
             "at the beginning/middle/end of the document; accept: drafts accepted (pooled);\n"
             "MAL: tokens emitted per target pass; prefill s: mean per answer, documents from the prefix cache")
    return "\n".join([*header, rule, line(columns), rule, *(line(row) for row in body), rule, notes])


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and in tests
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    points = [(s["median_speedup_vs_lc"], s["contains"], s["method"]) for s in results["summary"]
              if s["median_speedup_vs_lc"] is not None]
    placed: list[tuple[float, float]] = []
    span = max((x for x, _, _ in points), default=1.0) or 1.0
    for x, y, label in points:
        # Methods often tie on quality; stagger the labels of neighbours so none is printed over another.
        crowd = sum(1 for px, py in placed if abs(px - x) < 0.08 * span and abs(py - y) < 0.04)
        placed.append((x, y))
        ax.scatter([x], [y], s=40, label=label, zorder=3)
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, 5 + 11 * crowd), fontsize=8)
    if points:
        ax.legend(fontsize=7, loc="lower right")
    ax.axvline(1.0, color="grey", linewidth=0.8, linestyle="--")
    ax.set_xlabel("median decode speedup vs LC (same question, same run)")
    ax.set_ylabel("answer-contained rate")
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlim(left=0)
    models = results["models"]
    ax.set_title(f"{models['target']} / drafter {models['drafter']}, "
                 f"{results['context']['long_tokens']} context tokens, {results['n_questions']} questions",
                 fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_json(results: dict, path: Path) -> None:
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(results, indent=1))
    partial.replace(path)  # a run interrupted mid-write still leaves the last complete file


# ------------------------------------------------------------------------------------------------ run


def parser() -> argparse.ArgumentParser:
    from app.cli import add_model_options

    p = argparse.ArgumentParser(
        prog="ask eval",
        description="Quality (exact match, token F1, answer contained) and decode speed of every method "
        "on a QA set; LC runs first on each question and is the speedup baseline.",
    )
    p.add_argument("--docs", nargs="+", type=Path, metavar="PATH", help="documents or folders to index")
    p.add_argument("--index", type=Path, metavar="DIR",
                   help="index directory (default: one kept per --docs set)")
    p.add_argument("--questions", type=Path, metavar="JSONL",
                   help='one {"id", "question", "answers": [...], "page", "position"} per line (required)')
    p.add_argument("--report", type=Path, metavar="RESULTS_JSON",
                   help="only re-draw the table and plot of a finished (or interrupted) run from its results.json")
    p.add_argument("--methods", default=DEFAULT_METHODS, help=f"comma-separated (default {DEFAULT_METHODS}); "
                   "lc always runs, first")
    p.add_argument("--limit", type=int, help="only the first N questions")
    p.add_argument("--eta-sweep", type=_csv(float), metavar="E,E,...", help="rapid: one row per eta")
    p.add_argument("--gamma-sweep", type=_csv(int), metavar="G,G,...", help="rapid: one row per gamma")
    p.add_argument("--eta", type=float, help="rapid eta without a sweep (default 0)")
    p.add_argument("--gamma", type=int,
                   help="drafted tokens per target pass for sd, magicdec, rapid (default 5)")
    p.add_argument("--lookup", action="store_true",
                   help="rapid: try n-gram lookup drafts from the retrieved context first")
    p.add_argument("--max-new-tokens", type=int, default=48, help="answer length limit (default 48)")
    p.add_argument("--out", type=Path, metavar="DIR",
                   help="output folder (default $RAPIDQA_HOME/eval/TIMESTAMP)")
    p.add_argument("--no-warmup", action="store_true",
                   help="skip the untimed warm-up answer (it prefills the documents before any timing)")
    add_model_options(p)
    return p


def main(argv: Sequence[str]) -> int:
    from app.cli import check_document_args, index_dir_for, ingest_documents, log, settings_from_args

    args = parser().parse_args(argv)
    if args.report is not None:
        return report(args.report)
    if args.questions is None:
        raise CliError("--questions is required: a JSONL file of questions and acceptable answers")
    if args.limit is not None and args.limit < 1:
        raise CliError("--limit must be at least 1")
    check_document_args(args)
    settings = settings_from_args(args)
    # Greedy decoding makes every method's answer a deterministic function of its inputs.
    base = replace(settings.decoding, temperature=0.0)
    settings = replace(settings, decoding=base)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    runs = method_runs(methods, base, args.eta_sweep, args.gamma_sweep)
    items = load_questions(args.questions)[: args.limit]
    index_dir = index_dir_for(args, settings)
    out = args.out or settings.home / "eval" / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)

    from app.pipeline import Engine

    engine = Engine(settings, log=log)
    index = engine.open_index(index_dir)
    if args.docs:
        ingest_documents(index, args.docs, progress=False)
    documents = [doc.source for doc in index.documents()]
    if not documents:
        raise CliError(f"the index {index_dir} holds no documents: pass --docs")

    results = run_eval(engine, index, items, runs, settings, warmup=not args.no_warmup, out=out, log=log,
                       documents=documents, argv=list(argv))
    return write_report(results, out)


def report(results_json: Path) -> int:
    """Summary, table and plot again from the rows a run saved (they hold every measurement)."""
    try:
        results = json.loads(results_json.read_text())
        results["summary"] = summarize(results["rows"], results["methods"])
    except (OSError, ValueError, KeyError) as error:
        raise CliError(f"{results_json} is not an ask eval results.json ({error})") from error
    write_json(results, results_json)
    return write_report(results, results_json.parent)


def write_report(results: dict, out: Path) -> int:
    table = format_table(results)
    print(table)
    (out / "table.txt").write_text(table + "\n")
    plot(results, out / "quality_vs_speedup.png")
    print(f"\nresults: {out / 'results.json'}\nplot:    {out / 'quality_vs_speedup.png'}")
    return 0


def run_eval(
    engine: Engine, index: HybridIndex, items: list[QAItem], runs: list[MethodRun], settings: Settings,
    warmup: bool, out: Path, log: Callable[[str], None], documents: list[str], argv: list[str],
) -> dict:
    from app.pipeline import answer_once

    uses_drafter = any(METHODS[r.decoding.method].runs_drafter_model for r in runs)
    results: dict = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": ["ask", "eval", *argv],
        "machine": machine_info(str(engine.device), str(engine.target.model.dtype).removeprefix("torch.")),
        "models": {"target": settings.models.target,
                   "drafter": settings.models.drafter if uses_drafter else None},
        "documents": documents,
        "decoding": asdict(settings.decoding),  # every knob, so a result can be reproduced
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
        short = replace(settings.decoding, method="lc", max_new_tokens=2)
        done = answer_once(engine, items[0].question, index, short)
        results["warmup"] = {"seconds": time.perf_counter() - started, "prefill_s": done.stats.prefill_s,
                             "context_tokens": done.stats.context_tokens,
                             "prefix_cached_tokens": done.stats.prefix_cached_tokens}
    rows: list[dict] = results["rows"]
    for number, item in enumerate(items, 1):
        lc_tokens_per_s: float | None = None
        lc_answer_s: float | None = None
        for run in runs:
            done = answer_once(engine, item.question, index, run.decoding)
            if run.decoding.method == "lc":
                lc_tokens_per_s, lc_answer_s = done.stats.decode_tokens_per_s, done.stats.answer_s
            row = score_row(item, run, done.answer, done.stats, lc_tokens_per_s, lc_answer_s)
            rows.append(row)
            log(f"[{number}/{len(items)} {item.id}] {run.label}: "
                f"{_fmt(row['decode_tokens_per_s'], '.2f')} tok/s, "
                f"speedup {_fmt(row['speedup_vs_lc'], '.2f')}, "
                f"contains={'yes' if row['contains'] else 'no'}: {' '.join(done.answer.split())[:80]!r}")
        results["summary"] = summarize(rows, results["methods"])
        results["context"] = context_summary(rows)
        write_json(results, out / "results.json")  # after every question: a long run keeps what it measured
    results["complete"] = True
    write_json(results, out / "results.json")
    return results


def context_summary(rows: list[dict]) -> dict:
    long = [r["context_tokens"] for r in rows if r["base_method"] == "lc"]
    draft = [r["draft_context_tokens"] for r in rows if r["base_method"] == "rapid"]
    return {
        "long_tokens": int(statistics.median(long)) if long else None,
        "long_tokens_range": [min(long), max(long)] if long else None,
        "draft_tokens": int(statistics.median(draft)) if draft else None,
    }


__all__ = ["contains_answer", "exact_match", "main", "normalize", "token_f1"]
