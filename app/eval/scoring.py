"""Scoring eval answers: SQuAD-style exact match, token F1, answer contained, and per-method summaries.

Imports neither torch nor the models, so `ask eval --report` and the tests score without them.
"""

from __future__ import annotations

import re
import statistics
import string
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from app.eval.exactness import exactness_count
from app.report import stats_record
from decoding.methods import BASELINE, METHODS, Drafting

if TYPE_CHECKING:
    from app.eval.types import MethodRun, QAItem
    from decoding.stats import Stats

POSITIONS = ("beginning", "middle", "end")

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


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z`'\"(])|\n")


def first_sentence(text: str) -> str:
    """Up to the first sentence end (a stop followed by a capital) or line break."""
    return _SENTENCE_END.split(text.strip(), maxsplit=1)[0]


def lead_contains(prediction: str, answers: Iterable[str]) -> bool:
    """An acceptable answer in the answer's first sentence.

    "contains" credits an answer that lists several candidates, or buries the right one after a wrong
    claim; EM and F1 penalise a correct answer phrased as a sentence. This scores what the answer
    commits to first, in its own words: paraphrases of the gold answer are covered by the
    alternatives each question lists.
    """
    return contains_answer(first_sentence(prediction), answers)


def median_or_none(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def mean_or_none(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.fmean(present) if present else None



def score_row(item: QAItem, run: MethodRun, answer: str, stats: Stats, lc_tokens_per_s: float | None,
              lc_answer_s: float | None = None) -> dict:
    method = METHODS[run.decoding.method]
    tokens_per_s = stats.decode_tokens_per_s
    speedup = tokens_per_s / lc_tokens_per_s if tokens_per_s and lc_tokens_per_s else None
    e2e_speedup = lc_answer_s / stats.answer_s if lc_answer_s and stats.answer_s else None
    return {
        "id": item.id,
        "question": item.question,
        "position": item.position,
        "page": item.page,
        "method": run.label,
        "base_method": run.decoding.method,
        "eta": run.decoding.eta if method.eta_applies else None,
        "gamma": run.decoding.gamma if method.speculative else None,
        "budget": run.budget,
        "style": run.style,
        "answer": answer,
        "answers": item.answers,
        "exact_match": exact_match(answer, item.answers),
        "f1": token_f1(answer, item.answers),
        "contains": contains_answer(answer, item.answers),
        "lead": lead_contains(answer, item.answers),
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
        "stats": stats_record(stats),
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
            # From the saved answers, so results written before this scorer existed gain it on --report.
            "lead": sum(lead_contains(r["answer"], r["answers"]) for r in mine) / len(mine),
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
            # [rows equal to LC token for token, rows that must be] (eta = 0 speculative rows), else None.
            "equals_lc": list(counted) if (counted := exactness_count(mine)) else None,
            # End to end: question received -> last token, retrieval included (older results lack it).
            "median_answer_s": median_or_none(r.get("answer_s") for r in mine),
            "median_first_token_s": median_or_none(r["stats"].get("question_to_first_s") for r in mine),
            # First answer token to the second: the drafter's read plus one draft-and-verify round.
            "median_second_token_s": median_or_none(r["stats"].get("second_token_s") for r in mine
                                                    if r["generated"] > 1),
            "median_e2e_speedup_vs_lc": median_or_none(r.get("e2e_speedup_vs_lc") for r in mine),
            # Retrieval found the labelled page / found it inside the window the target read.
            "page_retrieved": mean_or_none(r.get("page_retrieved") for r in mine),
            "page_read": mean_or_none(r.get("page_read") for r in mine),
        })
    return summary


def context_summary(rows: list[dict]) -> dict:
    long = [r["context_tokens"] for r in rows if r["method"] == BASELINE]
    # The drafter's context is the retrieved passages only where the drafter model reads them (RAPID).
    draft = [r["draft_context_tokens"] for r in rows if METHODS[r["base_method"]].drafting is Drafting.RAG_MODEL]
    return {
        "long_tokens": int(statistics.median(long)) if long else None,
        "long_tokens_range": [min(long), max(long)] if long else None,
        "draft_tokens": int(statistics.median(draft)) if draft else None,
    }
