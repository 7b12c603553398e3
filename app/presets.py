"""The answer modes offered by name (`--mode`, the UI's "Answer mode", the API's model names).

Each is chosen on the tune half of `data/qaset.jsonl` and reported on the report half (README
"Answer quality"); the method, eta and gamma here are the product's defaults, and every one of
them can still be set by hand.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from decoding.settings import DecodingSettings


@dataclass(frozen=True)
class Preset:
    name: str
    label: str  # one line for the UI
    method: str
    eta: float
    gamma: int

    def apply(self, decoding: DecodingSettings) -> DecodingSettings:
        return replace(decoding, method=self.method, eta=self.eta, gamma=self.gamma)


# Exact: eta = 0 returns LC's tokens, decoded faster.
FAST = Preset("fast", "Fast: the long-context answer, exactly, sooner", "rapid", 0.0, 5)
# The target drafts for itself from the retrieved passages and leans its answer towards them. Of
# the settings swept on the tune half (`ask eval --docs TUNE --questions data/qaset.jsonl --split
# tune --methods lc,rag,rapid,rapid-self --eta-sweep 1,2,4`, then rapid-self at eta 8 and 16, the
# "lead" answer style and passage budgets of 1024 and 4096; 2026-12-06, commit 85715fd, 148
# questions), eta 4 scored highest on contains and lead (+0.03 and +0.04 over LC, paired intervals
# including 0). On the report half (README "Answer quality") it was +0.02 on both, intervals again
# including 0: not shown better than Fast, so it is named for what it does, not for a gain.
PASSAGES = Preset("passages", "Passages: the target also weighs the retrieved passages (slower)", "rapid-self",
                  4.0, 5)
PRESETS: dict[str, Preset] = {p.name: p for p in (FAST, PASSAGES)}
