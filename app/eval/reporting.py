"""Eval reports: the terminal table (also table.txt), results.json and the quality-vs-speedup plot."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

from app.engine_label import engine_label
from app.errors import CliError
from app.eval.exactness import differing_rows
from app.eval.intervals import format_interval_table, interval_summary
from app.eval.scoring import POSITIONS, summarize


def figure(value: float | None, spec: str, missing: str = "n/a") -> str:
    """A measured value for a table, or `missing` when it could not be measured."""
    return missing if value is None else format(value, spec)


def format_table(results: dict) -> str:
    machine, models, context = results["machine"], results["models"], results["context"]
    device = machine["device"] if machine["device"] != "cpu" else "CPU"
    header = [
        f"machine: {machine['processor']}, {machine['cores']} cores (torch threads "
        f"{machine['torch_threads']}), device {device}, {machine['dtype']}",
        f"models: target {models['target']}, drafter {models['drafter']}",
        f"engine: {engine_label(results.get('engine') or {})}"
        + (f" (WARNING: {results['engine']['warning']})" if (results.get("engine") or {}).get("warning") else ""),
        f"documents: {', '.join(results['documents'])}; long context {context['long_tokens']} tokens "
        f"(median over questions), drafter context {context['draft_tokens']} tokens",
        f"questions: {results['n_questions']}, greedy, "
        f"max_new_tokens {results['decoding']['max_new_tokens']}; "
        f"speedup = median over questions of decode tok/s / LC decode tok/s on the same question; "
        f"answer s = median seconds from question to last token, e2e speedup = LC's over the method's",
        *(f"beside: {run['models']['target']} (drafter {run['models']['drafter']}) rows from {run['results']}; "
          "their speedups against that run's LC, their paired differences against this run's LC"
          for run in results.get("beside", [])),
    ]
    columns = ["method", "EM", "F1", "contains", "lead", "b/m/e", "len", "tok/s", "accept", "MAL", "prefill s",
               "speedup", "1st tok s", "2nd tok s", "answer s", "e2e speedup", "= LC"]
    body = []
    for s in results["summary"]:
        positions = "/".join(figure(s["contains_by_position"][p], ".2f", "-") for p in POSITIONS)
        body.append([
            s["method"], f"{s['exact_match']:.2f}", f"{s['f1']:.2f}", f"{s['contains']:.2f}", f"{s['lead']:.2f}",
            positions, f"{s['generated']:.1f}",
            figure(s["decode_tokens_per_s"], ".2f"), figure(s["acceptance_rate"], ".1%"),
            figure(s["mean_accepted_length"], ".2f"), f"{s['prefill_s']:.2f}",
            figure(s["median_speedup_vs_lc"], ".2f") + ("x" if s["median_speedup_vs_lc"] is not None else ""),
            figure(s.get("median_first_token_s"), ".2f"), figure(s.get("median_second_token_s"), ".2f"),
            figure(s.get("median_answer_s"), ".2f"),
            figure(s.get("median_e2e_speedup_vs_lc"), ".2f") + ("x" if s.get("median_e2e_speedup_vs_lc") else ""),
            f"{s['equals_lc'][0]}/{s['equals_lc'][1]}" if s.get("equals_lc") else "-",
        ])
    widths = [max(len(row[i]) for row in [columns, *body]) for i in range(len(columns))]

    def line(cells: list[str]) -> str:
        pairs = enumerate(zip(cells, widths, strict=True))
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in pairs)

    rule = "-" * len(line(columns))
    notes = ("EM/F1/contains: exact match, token F1, answer contained; lead: answer contained in the\n"
             "answer's first sentence; b/m/e: contains rate for facts at the beginning/middle/end of the\n"
             "document; len: mean answer tokens; accept: drafts accepted (pooled);\n"
             "MAL: tokens emitted per target pass; prefill s: mean per answer, documents from the prefix cache;\n"
             "1st tok s: median from the question's arrival to the first token (retrieval included);\n"
             "2nd tok s: median from the first token to the second;\n"
             "= LC: eta = 0 speculative answers equal to LC's token for token (they must all be)")
    table = [*header, rule, line(columns), rule, *(line(row) for row in body), rule, notes]
    if results.get("rows"):
        records = results.get("intervals") or interval_summary(results["rows"], results["methods"])
        table.append(format_interval_table(records))
    return "\n".join(table)


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


def load_results(results_json: Path) -> dict:
    try:
        results = json.loads(results_json.read_text())
        results["summary"] = summarize(results["rows"], results["methods"])
    except (OSError, ValueError, KeyError) as error:
        raise CliError(f"{results_json} is not an ask eval results.json ({error})") from error
    return results


def report(results_json: Path, beside: Sequence[Path] = (), out: Path | None = None) -> int:
    """Summary, table and plot again from the rows a run saved (they hold every measurement).

    beside: other runs on the same questions (another target's, such as upward speculation): their
    rows join the table, each method named after its run's target, paired against this run's LC.
    The merged report goes to `out` (default: beside/ in this run's folder)."""
    results = load_results(results_json)
    if not beside:
        write_json(results, results_json)
        return write_report(results, results_json.parent)
    for path in beside:
        results = with_rows_of(results, load_results(path), path)
    out = out or results_json.parent / "beside"
    out.mkdir(parents=True, exist_ok=True)
    return write_report(results, out)


def with_rows_of(results: dict, other: dict, path: Path) -> dict:
    """`results` with `other`'s rows added, each method prefixed by other's target (its speedups stay
    against its own LC). Both runs must have answered the same questions."""
    ids, others = {q["id"] for q in results["questions"]}, {q["id"] for q in other["questions"]}
    if ids != others:
        raise CliError(f"{path} answered other questions than the run it should join "
                       f"({len(others - ids)} not in it, {len(ids - others)} missing)")
    prefix = f"{other['models']['target']} "
    rows = [dict(row, method=prefix + row["method"]) for row in other["rows"]]
    methods = [*results["methods"], *(prefix + method for method in other["methods"])]
    merged = dict(results, rows=results["rows"] + rows, methods=methods,
                  beside=[*results.get("beside", []), {"results": str(path), "models": other["models"]}])
    merged["summary"] = summarize(merged["rows"], methods)
    return merged


def write_report(results: dict, out: Path) -> int:
    """Table and plot; non-zero when an answer that must equal LC's differs (the run found a bug)."""
    if results.get("rows"):
        # Kept in results.json too: the intervals and paired differences the table prints.
        results["intervals"] = interval_summary(results["rows"], results["methods"])
        write_json(results, out / "results.json")
    table = format_table(results)
    print(table)
    (out / "table.txt").write_text(table + "\n")
    plot(results, out / "quality_vs_speedup.png")
    print(f"\nresults: {out / 'results.json'}\nplot:    {out / 'quality_vs_speedup.png'}")
    differing = differing_rows(results["rows"])
    if differing:
        print(f"ask eval: error: {len(differing)} eta = 0 speculative answer(s) differ from LC's tokens, "
              f"which exact decoding forbids: {'; '.join(differing)}", file=sys.stderr)
        return 1
    return 0
