"""Decoding knobs; one section of app.config.Settings."""

from __future__ import annotations

from dataclasses import dataclass

from decoding.methods import METHODS

# A verify pass runs gamma + 1 rows. Up to attention.SMALL_T rows every path (the C kernel, the
# torch fallback) computes each row independently of the others, which is what makes eta = 0
# speculation return exactly the target's greedy tokens; beyond it the torch path switches kernels.
MAX_GAMMA = 16


class SettingsError(ValueError):
    """A decoding setting is out of range; the message is for the user."""


@dataclass(frozen=True)
class DecodingSettings:
    method: str = "rapid"
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int = 0
    gamma: int = 5  # drafted tokens per target pass (paper: 10; fewer pays off on a CPU)
    eta: float = 0.0  # retrieval-augmented target strength; 0 = exact target distribution
    tail_guard: float = 0.1  # keep p where p_hat < tail_guard * max(p_hat)
    magicdec_sinks: int = 4
    magicdec_window: int = 1024
    lookup_ngram: int = 3  # n-gram length matched by lookup drafting (prompt lookup, RAPID+lookup)
    lookup_in_rapid: bool = False  # RAPID tries n-gram lookup drafts from its retrieved context first
    # A model drafter stops its block early once its own top probability falls below this: such
    # drafts are mostly rejected, and each costs a drafter step. 0 always drafts gamma tokens.
    draft_confidence: float = 0.5
    # Model drafters score only the tokens of the prompts (documents, passages, question) and the
    # stop tokens: the output layer is a large share of a step (a third of the 0.5B's bytes), and a
    # token the prompts never hold is rarely a draft the target accepts. Exactness is unaffected:
    # the target verifies every draft, and sampling accepts against the distribution drafted from.
    draft_vocabulary: bool = True

    def validate(self) -> None:
        if self.method not in METHODS:
            raise SettingsError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.max_new_tokens < 1:
            raise SettingsError("max_new_tokens must be at least 1")
        if self.temperature < 0:
            raise SettingsError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise SettingsError("top_p must be in (0, 1]")
        if not 1 <= self.gamma <= MAX_GAMMA:
            raise SettingsError(f"gamma must be between 1 and {MAX_GAMMA}")
        if self.eta < 0:
            raise SettingsError("eta must be >= 0")
        if not 0 <= self.draft_confidence < 1:
            raise SettingsError("draft_confidence must be in [0, 1)")
