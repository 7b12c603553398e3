"""The answer modes offered by name in the CLI (--quality) and the UI, chosen from `ask eval` tables.

README "Answer quality" holds the measurements each choice rests on; the method, eta and gamma here
are the product's defaults, and every one of them can still be set by hand.
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


# Exact: eta = 0 returns LC's tokens, decoded faster; with the 0.5B drafter eta > 0 cost quality.
FAST = Preset("fast", "Fast: the long-context answer, exactly, sooner", "rapid", 0.0, 5)
# The target as its own RAG drafter at the eta that scored best of the RAPID settings measured on
# the 36-question set (above LC on contains, lead and F1; below RAG, which reads only the passages
# and answers several times slower); level with LC on contains on the big-corpus set. Not yet above
# both: README "Chunk KV read after the header".
QUALITY = Preset("quality", "Quality: the target also weighs the retrieved passages (slower)", "rapid-self", 2.0, 5)
PRESETS: dict[str, Preset] = {p.name: p for p in (FAST, QUALITY)}
