"""The remaining time of a prefill, from what its chunks cost so far at their depths.

A chunk's cost grows with its depth: every token reads the weights (a constant) and attends to
every token before it (proportional to its depth). So the seconds of a chunk of n tokens from depth
d0 to d1 are a * n + b * n * (d0 + d1) / 2, and the rest of the read costs the integral of
a + b * depth over the depths still to go. a and b are fitted by least squares to the chunks
measured in this read, so they follow the machine, its load and the KV form (an 8-bit cache
changes b). A plain rate (tokens done / seconds) assumes b = 0 and so promises a deep read far too
early.

Work whose cost does not grow with its progress (passages encoded one by one, each after the same
header) is fitted with b = 0: its measured rate.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ChunkCost:
    start: int  # depth (tokens already in the cache) where the chunk began
    end: int
    seconds: float

    @property
    def tokens(self) -> int:
        return self.end - self.start

    @property
    def token_depths(self) -> float:
        """The sum of its tokens' depths: what b multiplies."""
        return self.tokens * (self.start + self.end) / 2


# How far a chunk's measured time strays from the curve (a machine's other work), relative to it;
# and how far the true b / a may stray from the one the model's shape gives, relative to it. Their
# ratio weighs the shape's b / a against the chunks: it decides the slope while the chunks measured
# span little depth (early in a read, when one noisy chunk would tilt a free fit), and the chunks
# decide it once they span more.
CHUNK_NOISE = 0.1
PRIOR_SPREAD = 0.5


@dataclass
class DepthCostFit:
    """Seconds per token = a + b * depth, least squares over the chunks added so far.

    prior_ratio: the b / a that the model's shape gives (decoding.pass_costs.depth_cost_ratio);
    None fits a and b from the chunks alone. deepens False: the cost does not grow with progress
    (b = 0, the measured rate).
    """

    prior_ratio: float | None = None
    deepens: bool = True
    chunks: list[ChunkCost] = field(default_factory=list)

    def add(self, start: int, end: int, seconds: float) -> None:
        if end > start and seconds >= 0:
            self.chunks.append(ChunkCost(start, end, seconds))

    def coefficients(self) -> tuple[float, float] | None:
        """(a, b), both >= 0; None before any chunk was measured."""
        if not self.chunks:
            return None
        rate_only = sum(c.seconds for c in self.chunks) / sum(c.tokens for c in self.chunks), 0.0
        if not self.deepens:
            return rate_only
        # Weighted least squares on each chunk's seconds per token at its mean depth, a chunk
        # weighing by its share of a full one (a short part, e.g. the prompt header, counts little),
        # plus the prior as one more row: (b / r - a) = 0.
        longest = max(c.tokens for c in self.chunks)
        rows = [(c.tokens / longest, 1.0, c.token_depths / c.tokens, c.seconds / c.tokens) for c in self.chunks]
        if self.prior_ratio:
            rows.append(((CHUNK_NOISE / PRIOR_SPREAD) ** 2, -1.0, 1.0 / self.prior_ratio, 0.0))
        s11 = sum(w * u * u for w, u, _, _ in rows)
        s12 = sum(w * u * v for w, u, v, _ in rows)
        s22 = sum(w * v * v for w, _, v, _ in rows)
        s1y = sum(w * u * y for w, u, _, y in rows)
        s2y = sum(w * v * y for w, _, v, y in rows)
        det = s11 * s22 - s12 * s12
        if det <= 1e-12 * s11 * s22:  # the chunks span no depth and there is no prior: a rate
            return rate_only
        a, b = (s1y * s22 - s12 * s2y) / det, (s11 * s2y - s12 * s1y) / det
        if b < 0:  # noise made later chunks look cheaper: the cost does not fall with depth
            return rate_only
        if a < 0:  # all of it attention
            depths = sum(c.token_depths ** 2 for c in self.chunks)
            return (0.0, sum(c.seconds * c.token_depths for c in self.chunks) / depths) if depths else rate_only
        return a, b

    def remaining_s(self, depth: int, end: int) -> float | None:
        """Seconds to read from `depth` to `end`; None before any chunk was measured."""
        fitted = self.coefficients()
        if fitted is None:
            return None
        a, b = fitted
        return max(0.0, a * (end - depth) + b * (end * end - depth * depth) / 2)
