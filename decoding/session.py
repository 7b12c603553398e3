"""A model reading its prompt plus the shared answer, and the sampler every method draws with."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from decoding.cache import KVCache
from decoding.sampling import argmax, probabilities, sample
from decoding.settings import DecodingSettings
from decoding.transformer import Rows, Run, Transformer, run_alone


@dataclass
class Session:
    """One model reading one prompt followed by the answer tokens shared with the other session.

    Positions are explicit: the cache holds the prompt and the first `cache.next_position -
    len(prompt)` answer tokens. It always lags the answer by at least one token (the token chosen
    last is fed at the start of the next pass), so every pass both feeds it and yields fresh logits.
    """

    model: Transformer
    cache: KVCache
    prompt: list[int]
    output: list[int]  # shared with the other session: the committed answer tokens
    head: nn.Module | None = None  # replaces the model's lm_head (a drafter scoring fewer tokens)
    run: Run = run_alone  # who runs its passes (a scheduler batching them with other sessions')
    drafting: bool = False  # a drafter's session

    def tokens(self) -> list[int]:
        return self.prompt + self.output

    def pending(self) -> list[int]:
        """Answer tokens not yet in the cache."""
        return self.output[self.cache.next_position - len(self.prompt) :]

    def forward(self, tokens: list[int], all_logits: bool = False) -> torch.Tensor:
        ids = torch.tensor(tokens, dtype=torch.long, device=self.model.device)
        return self.run(self.model, Rows(ids, self.cache, all_logits, self.head, self.drafting))

    def step(self) -> torch.Tensor:
        """Feed the pending tokens; the logits after the last one."""
        return self.forward(self.pending())

    def keep(self, n_output: int) -> None:
        """Forget rejected drafts: keep the prompt and at most the first n_output answer tokens."""
        self.cache.crop(min(self.cache.next_position, len(self.prompt) + n_output))


@dataclass
class Sampler:
    settings: DecodingSettings
    generator: torch.Generator

    @classmethod
    def seeded(cls, settings: DecodingSettings) -> Sampler:
        return cls(settings, torch.Generator().manual_seed(settings.seed))

    @property
    def greedy(self) -> bool:
        return self.settings.temperature == 0

    def choose(self, logits: torch.Tensor) -> int:
        if self.greedy:
            return argmax(logits)
        return sample(probabilities(logits, self.settings.temperature, self.settings.top_p), self.generator)
