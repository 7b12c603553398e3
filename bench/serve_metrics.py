"""bench.serve's figures: what one user saw, a round's summary row, and the markdown table.

No model and no server here: the functions take timings, so they are tested with made-up ones.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class UserResult:
    """One user's answer in a round, timed by that user: seconds from the user's own start."""

    question_id: str
    first_token_s: float | None  # None: no token came (an error, or an empty answer)
    answer_s: float | None  # None: the answer never finished (error)
    tokens: list[int]  # the answer's token ids
    started: float  # perf_counter at the user's start (the round's wall clock spans all users)
    ended: float  # perf_counter when the answer finished or failed
    error: str | None = None
    draft_lengths: list[int] = field(default_factory=list)  # what the scheduler chose before each verify


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100) by linear interpolation between the closest ranks (numpy's
    default), so that p50 of two users is their mean and p95 of one user is that user; None if empty."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} is outside 0..100")
    ordered = sorted(values)
    if not ordered:
        return None
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def aggregate_tokens_per_s(users: Sequence[UserResult]) -> float | None:
    """All users' answer tokens over the round's wall seconds (the first start to the last end)."""
    if not users:
        return None
    wall = max(u.ended for u in users) - min(u.started for u in users)
    return sum(len(u.tokens) for u in users) / wall if wall > 0 else None


def round_row(engine: str, users: Sequence[UserResult], solo: dict[str, UserResult],
              peak_rss_gb: float | None) -> dict[str, object]:
    """A round's row: N users' throughput and latencies, the same questions' solo answer times, and
    whether every answer is token for token the same question's solo answer."""
    answered = [u for u in users if u.error is None and u.answer_s is not None]
    first = [u.first_token_s for u in answered if u.first_token_s is not None]
    seconds = [u.answer_s for u in answered if u.answer_s is not None]
    solo_s = [s.answer_s for u in users if (s := solo.get(u.question_id)) is not None and s.answer_s is not None]
    same = [u.question_id in solo and u.tokens == solo[u.question_id].tokens for u in answered]
    return {
        "engine": engine,
        "users": len(users),
        "answered": len(answered),
        "errors": [u.error for u in users if u.error is not None],
        "answer_tokens": sum(len(u.tokens) for u in answered),
        "wall_s": max(u.ended for u in users) - min(u.started for u in users) if users else None,
        "aggregate_tokens_per_s": aggregate_tokens_per_s(answered) if len(answered) == len(users) else None,
        "first_token_p50_s": percentile(first, 50),
        "first_token_p95_s": percentile(first, 95),
        "answer_p50_s": percentile(seconds, 50),
        "answer_p95_s": percentile(seconds, 95),
        "solo_answer_p50_s": percentile(solo_s, 50),
        "answer_p50_over_solo": _ratio(percentile(seconds, 50), percentile(solo_s, 50)),
        "same_tokens_as_solo": f"{sum(same)}/{len(users)}",
        "peak_rss_gb": peak_rss_gb,
        "mean_draft_length": _mean([k for u in answered for k in u.draft_lengths]),
        "per_user": [{"question_id": u.question_id, "first_token_s": u.first_token_s, "answer_s": u.answer_s,
                      "tokens": len(u.tokens), "error": u.error,
                      "solo_answer_s": solo[u.question_id].answer_s if u.question_id in solo else None}
                     for u in users],
    }


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


COLUMNS = (  # (header, key, format)
    ("engine", "engine", "{}"),
    ("users", "users", "{}"),
    ("answer tok/s (all users)", "aggregate_tokens_per_s", "{:.2f}"),
    ("TTFT p50 s", "first_token_p50_s", "{:.2f}"),
    ("TTFT p95 s", "first_token_p95_s", "{:.2f}"),
    ("answer p50 s", "answer_p50_s", "{:.2f}"),
    ("answer p95 s", "answer_p95_s", "{:.2f}"),
    ("alone p50 s", "solo_answer_p50_s", "{:.2f}"),
    ("p50 / alone", "answer_p50_over_solo", "{:.2f}x"),
    ("= alone", "same_tokens_as_solo", "{}"),
    ("peak RSS GB", "peak_rss_gb", "{:.2f}"),
    ("mean draft", "mean_draft_length", "{:.1f}"),
)


def markdown_table(rows: Sequence[dict[str, object]]) -> str:
    """The rows as a markdown table; a missing figure is '-', a round with errors says how many."""
    lines = ["| " + " | ".join(header for header, _, _ in COLUMNS) + " |",
             "|" + "|".join("---" if key == "engine" else "--:" for _, key, _ in COLUMNS) + "|"]
    for row in rows:
        cells = ["-" if row.get(key) is None else fmt.format(row[key]) for _, key, fmt in COLUMNS]
        if row.get("errors"):
            cells[0] += f" ({len(row['errors'])} failed)"  # type: ignore[arg-type]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
