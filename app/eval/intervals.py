"""95% intervals for the eval's quality columns, and each method's paired difference against LC.

- A method's own rate: Wilson score interval for the binary columns (EM, contains, lead), a
  percentile bootstrap over questions for the mean F1.
- Against LC: a percentile bootstrap of the mean per-question difference (method minus LC on the
  same question, the same resampled questions for every column), and McNemar's exact test on the
  binary columns. A method is better than LC on a column when the whole paired interval lies above 0.

The bootstrap draws from a generator seeded with SEED, so a table is reproducible from its rows.
Imports neither torch nor numpy: `ask eval --report` and the tests run without them.
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from app.eval.scoring import lead_contains
from decoding.methods import BASELINE

LEVEL = 0.95
Z = 1.959963984540054  # the standard normal quantile at 0.975
SEED = 20261205
RESAMPLES = 2000
BINARY = ("exact_match", "contains", "lead")
COLUMNS = ("exact_match", "f1", "contains", "lead")
HEADINGS = {"exact_match": "EM", "f1": "F1", "contains": "contains", "lead": "lead"}


@dataclass(frozen=True)
class Interval:
    low: float
    high: float

    def above_zero(self) -> bool:
        return self.low > 0

    def below_zero(self) -> bool:
        return self.high < 0


def wilson(successes: int, n: int, z: float = Z) -> Interval:
    """Wilson score interval for a proportion: stays inside [0, 1] and is sound at 0 or n successes."""
    if n < 1:
        raise ValueError("a proportion needs at least one trial")
    if not 0 <= successes <= n:
        raise ValueError(f"{successes} successes in {n} trials")
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    # At 0 or n successes the bound equals the observed rate; rounding must not put it past it.
    return Interval(min(p, max(0.0, centre - half)), max(p, min(1.0, centre + half)))


def resample_indices(n: int, resamples: int = RESAMPLES, seed: int = SEED) -> list[list[int]]:
    """The bootstrap's draws of n questions with replacement; the same for every column and method."""
    if n < 1:
        raise ValueError("a bootstrap needs at least one question")
    rng = random.Random(seed)
    return [[rng.randrange(n) for _ in range(n)] for _ in range(resamples)]


def bootstrap_mean(values: Sequence[float], draws: Sequence[Sequence[int]]) -> Interval:
    """Percentile interval of the mean over the resampled questions."""
    means = sorted(math.fsum(values[i] for i in draw) / len(draw) for draw in draws)
    tail = (1 - LEVEL) / 2
    low = means[math.floor(tail * (len(means) - 1))]
    high = means[math.ceil((1 - tail) * (len(means) - 1))]
    return Interval(low, high)


def mcnemar_exact(method_only: int, baseline_only: int) -> float:
    """Two-sided exact McNemar p-value from the discordant pairs (binomial with p = 1/2)."""
    n = method_only + baseline_only
    if n == 0:
        return 1.0
    k = min(method_only, baseline_only)
    tail = math.fsum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def paired_rows(rows: list[dict], label: str) -> list[tuple[dict, dict]]:
    """(LC row, method row) for every question both answered, in LC's order."""
    mine = {r["id"]: r for r in rows if r["method"] == label}
    return [(lc, mine[lc["id"]]) for lc in rows if lc["method"] == BASELINE and lc["id"] in mine]


def score(row: dict, column: str) -> float:
    if column == "lead":  # as the summary scores it: from the saved answer, so older results have it
        return float(lead_contains(row["answer"], row["answers"]))
    return float(row[column])


def method_intervals(rows: list[dict], label: str, draws: Sequence[Sequence[int]] | None = None) -> dict:
    """{column: Interval} of one method's own rates over the questions it answered."""
    mine = [r for r in rows if r["method"] == label]
    result: dict[str, Interval] = {}
    for column in COLUMNS:
        values = [score(r, column) for r in mine]
        if column in BINARY:
            result[column] = wilson(int(sum(values)), len(values))
        else:
            fits = draws is not None and len(draws[0]) == len(values)
            result[column] = bootstrap_mean(values, draws if fits else resample_indices(len(values)))
    return result


def paired_difference(rows: list[dict], label: str, draws: Sequence[Sequence[int]] | None = None) -> dict | None:
    """Method minus LC on the same questions: mean, paired bootstrap interval, McNemar's p (binary)."""
    pairs = paired_rows(rows, label)
    if not pairs:
        return None
    draws = draws if draws is not None and len(draws[0]) == len(pairs) else resample_indices(len(pairs))
    columns = {}
    for column in COLUMNS:
        differences = [score(mine, column) - score(lc, column) for lc, mine in pairs]
        entry = {"mean": statistics.fmean(differences), "interval": bootstrap_mean(differences, draws)}
        if column in BINARY:
            wins = sum(d > 0 for d in differences)
            losses = sum(d < 0 for d in differences)
            entry |= {"wins": wins, "losses": losses, "mcnemar_p": mcnemar_exact(wins, losses)}
        columns[column] = entry
    return {"n": len(pairs), "columns": columns}


def interval_summary(rows: list[dict], labels: Sequence[str]) -> list[dict]:
    """One record per method with rows: its own intervals and, except for LC, its paired difference."""
    summary = []
    draws: dict[int, list[list[int]]] = {}  # drawing is the slow part: once per number of questions
    for label in labels:
        mine = [r for r in rows if r["method"] == label]
        if not mine:
            continue
        if len(mine) not in draws:
            draws[len(mine)] = resample_indices(len(mine))
        own = method_intervals(rows, label, draws[len(mine)])
        record = {"method": label, "n": len(mine),
                  "intervals": {column: [i.low, i.high] for column, i in own.items()}, "vs_lc": None}
        if label != BASELINE:
            n_pairs = len(paired_rows(rows, label))
            paired = paired_difference(rows, label, draws.get(n_pairs)) if n_pairs else None
            if paired is not None:
                record["vs_lc"] = {"n": paired["n"], "columns": {
                    column: {**{k: v for k, v in entry.items() if k != "interval"},
                             "interval": [entry["interval"].low, entry["interval"].high]}
                    for column, entry in paired["columns"].items()}}
        summary.append(record)
    return summary


def format_interval_table(records: list[dict]) -> str:
    """The intervals block printed under the main eval table."""
    columns = ["method", "n", *(f"{HEADINGS[c]} 95%" for c in COLUMNS),
               *(f"d{HEADINGS[c]} vs LC" for c in COLUMNS), "McNemar p (EM/cont/lead)"]
    body = []
    for record in records:
        own = [_span(record["intervals"][c], ".2f") for c in COLUMNS]
        paired = record["vs_lc"]
        if paired is None:
            diffs, p_values = ["-"] * len(COLUMNS), "-"
        else:
            diffs = [_difference(paired["columns"][c]) for c in COLUMNS]
            p_values = "/".join(f"{paired['columns'][c]['mcnemar_p']:.2f}" for c in BINARY)
        body.append([record["method"], str(record["n"]), *own, *diffs, p_values])
    widths = [max(len(row[i]) for row in [columns, *body]) for i in range(len(columns))]

    def line(cells: list[str]) -> str:
        pairs = enumerate(zip(cells, widths, strict=True))
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in pairs)

    rule = "-" * len(line(columns))
    note = ("95% intervals: Wilson score for EM/contains/lead, percentile bootstrap over questions for F1\n"
            f"({RESAMPLES} resamples, seed {SEED}). dX vs LC: mean per-question difference, method minus LC on\n"
            "the same questions, with its paired bootstrap 95% interval; a method is better than LC on a\n"
            "column only when that whole interval lies above 0 (marked +; below 0 marked -).\n"
            "McNemar p: two-sided exact test on the questions where exactly one of the two is right.")
    return "\n".join([rule, line(columns), rule, *(line(row) for row in body), rule, note])


def _span(bounds: Sequence[float], spec: str) -> str:
    return f"[{format(bounds[0], spec)},{format(bounds[1], spec)}]"


def _difference(entry: dict) -> str:
    low, high = entry["interval"]
    mark = "+" if low > 0 else "-" if high < 0 else " "
    return f"{entry['mean']:+.2f} {_span(entry['interval'], '+.2f')}{mark}"
