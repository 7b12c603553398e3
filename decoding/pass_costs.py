"""What a pass costs by model and row count, as measured, and the draft length it makes best.

On a CPU a decode step is bound by reading the weights, so a pass of a few rows costs little more
than one row; a verify block of k + 1 rows is nearly free alone. With other sessions in the pass it
is not: their rows are there already, and k more rows add compute the weights' read no longer
hides, while the other sessions wait through this session's k drafting passes. The draft length
that gives the most tokens per second at batch 1 is therefore too long at batch 8; it is chosen per
verify from the measured costs instead.
"""

from __future__ import annotations

import itertools
import threading
import weakref
from dataclasses import dataclass

from torch import nn

from decoding.transformer import ModelArgs

SMOOTHING = 0.3  # weight of a new measurement in a row count's running mean


@dataclass(frozen=True)
class Others:
    """What the other active sessions add to a pass, as one session plans its draft."""

    sessions: int
    drafting: int  # of them, sessions that draft (they share the drafting passes)


class PassCosts:
    """Running mean seconds of a pass per model and row count; estimates between and beyond them."""

    def __init__(self) -> None:
        self._seconds: weakref.WeakKeyDictionary[nn.Module, dict[int, float]] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()

    def record(self, model: nn.Module, rows: int, seconds: float) -> None:
        with self._lock:
            table = self._seconds.setdefault(model, {})
            old = table.get(rows)
            table[rows] = seconds if old is None else old + SMOOTHING * (seconds - old)

    def estimate(self, model: nn.Module, rows: int) -> float | None:
        """Seconds of a pass of `rows` rows: linear between the nearest measured row counts, and along
        the last two beyond them; None until two row counts are measured."""
        with self._lock:
            points = sorted(self._seconds.get(model, {}).items())
        if len(points) < 2:
            return None
        if rows <= points[0][0]:
            return points[0][1]  # fewer rows than measured: the weights' read bounds it anyway
        pairs = list(itertools.pairwise(points))
        (r0, s0), (r1, s1) = next(((a, b) for a, b in pairs if rows <= b[0]), pairs[-1])
        return max(s0 + (s1 - s0) * (rows - r0) / (r1 - r0), 0.0)


def expected_tokens(k: int, acceptance: float) -> float:
    """Tokens a verify of k drafts gives on average: the accepted run plus the target's own token,
    each draft accepted with probability `acceptance` once the ones before it were."""
    return sum(acceptance**i for i in range(k + 1))


def best_draft_length(costs: PassCosts, target: nn.Module, drafter: nn.Module | None, longest: int,
                      acceptance: float, others: Others) -> int:
    """The draft length in 0..longest that gives the batch the most tokens per second, if every
    drafting session drafts that many: (the drafting sessions' expected tokens + one per session that
    does not draft) / (the target pass with everyone's rows + the drafting passes). drafter: the model
    that drafts (None: drafts cost no pass, as lookup's). Alone, or before two row counts of a pass
    are measured, `longest` (the configured gamma) stands."""
    if others.sessions == 0 or longest <= 0:
        return longest
    drafting, plain = others.drafting + 1, others.sessions - others.drafting
    best, best_rate = longest, 0.0
    for k in range(longest + 1):
        target_s = costs.estimate(target, plain + drafting * (k + 1))
        step_s = costs.estimate(drafter, drafting) if drafter is not None and k else 0.0
        if target_s is None or step_s is None:
            return longest
        rate = (drafting * expected_tokens(k, acceptance) + plain) / (target_s + k * step_s)
        if rate > best_rate:
            best, best_rate = k, rate
    return best


def depth_cost_ratio(args: ModelArgs) -> float:
    """b / a of a prefill token's cost a + b * depth, from the model's shape: the multiply-adds of
    its attention per token of depth (q.k and the value sum, every layer and head) over those of
    its weights (the projections and the MLP; a prefill's output layer reads one row). Real kernels
    run the two at different speeds, so this is where an estimate starts, not what it ends at."""
    projections = args.dim * args.head_dim * (2 * args.n_heads + 2 * args.n_kv_heads)
    per_layer = projections + 3 * args.dim * args.intermediate_size
    return 2 * args.n_heads * args.head_dim / per_layer
