"""eta = 0 greedy speculative decoding must return LC's tokens exactly: eval checks every such row.

Eval is the one large run that combines windows, prefix extension and chunk KV, so a difference
there is a bug no smaller test found; the run fails and names the questions.
"""

from __future__ import annotations

from collections.abc import Sequence

from decoding.methods import METHODS
from decoding.settings import DecodingSettings


def must_equal_lc(decoding: DecodingSettings) -> bool:
    """Greedy, speculative, the target reading what LC reads, and no retrieval-augmented target (eta 0)."""
    method = METHODS[decoding.method]
    eta = decoding.eta if method.eta_applies else 0.0
    return method.speculative and not method.target_reads_rag and eta == 0.0 and decoding.temperature == 0.0


def first_difference(tokens: Sequence[int], lc_tokens: Sequence[int]) -> int | None:
    """The first position where the two answers differ (a shorter answer differs where it ends); None if equal."""
    for position, (mine, lc) in enumerate(zip(tokens, lc_tokens, strict=False)):
        if mine != lc:
            return position
    return None if len(tokens) == len(lc_tokens) else min(len(tokens), len(lc_tokens))


def exactness_row(decoding: DecodingSettings, tokens: Sequence[int], lc_tokens: Sequence[int] | None) -> dict:
    """equals_lc: True/False where the row must equal LC token for token, None where it need not."""
    if not must_equal_lc(decoding) or lc_tokens is None:
        return {"equals_lc": None, "differs_from_lc_at": None}
    at = first_difference(tokens, lc_tokens)
    return {"equals_lc": at is None, "differs_from_lc_at": at}


def exactness_count(rows: Sequence[dict]) -> tuple[int, int] | None:
    """(rows equal to LC, rows checked) among rows that must equal LC; None when none must."""
    checked = [r["equals_lc"] for r in rows if r.get("equals_lc") is not None]
    return (sum(checked), len(checked)) if checked else None


def differing_rows(rows: Sequence[dict]) -> list[str]:
    """The rows that should have equalled LC and did not, for the failure message."""
    return [f"{r['id']} {r['method']} (first differs at answer token {r['differs_from_lc_at']})"
            for r in rows if r.get("equals_lc") is False]
