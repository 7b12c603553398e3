"""Who proposes tokens for the target to verify: one small class per kind of drafting.

Each drafter has `propose(k, sampler) -> Draft` and `keep(n_output)` (forget rejected drafts).
`build_drafter` picks one from the method table (decoding/methods.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from decoding.cache import StreamingCache
from decoding.methods import Drafting, Method
from decoding.models import LoadedModel, Prompt
from decoding.session import Sampler, Session
from decoding.settings import DecodingSettings


@dataclass
class Draft:
    tokens: list[int] = field(default_factory=list)
    # Per token: the drafter's logits (model drafts) or None (lookup drafts: q is one-hot).
    logits: list[torch.Tensor | None] = field(default_factory=list)


class ModelDrafter:
    """Drafts with a language model on its own context (RAG drafter, SD drafter, MagicDec window)."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def propose(self, k: int, sampler: Sampler) -> Draft:
        draft = Draft()
        logits = self.session.step()
        for i in range(k):
            token = sampler.choose(logits)
            draft.tokens.append(token)
            draft.logits.append(logits)
            if i == k - 1 or self._unsure(logits, sampler.settings.draft_confidence):
                break  # the last draft is fed with the next pass's pending tokens
            logits = self.session.forward([token])
        return draft

    @staticmethod
    def _unsure(logits: torch.Tensor, threshold: float) -> bool:
        return threshold > 0 and float(torch.softmax(logits, dim=-1).max()) < threshold

    def keep(self, n_output: int) -> None:
        self.session.keep(n_output)
        self.session.cache.after_commit()


class LookupDrafter:
    """Prompt-lookup drafting: continue the latest earlier occurrence of the answer's last n-gram."""

    def __init__(self, source: Callable[[], list[int]], max_ngram: int) -> None:
        self.source = source
        self.max_ngram = max_ngram

    def propose(self, k: int, sampler: Sampler) -> Draft:
        continuation = lookup_continuation(self.source(), self.max_ngram, k)
        return Draft(continuation, [None] * len(continuation))

    def keep(self, n_output: int) -> None:
        pass


def lookup_continuation(tokens: list[int], max_ngram: int, k: int) -> list[int]:
    """Up to k tokens that followed the most recent earlier match of the last n tokens (n >= 2)."""
    seq = torch.tensor(tokens, dtype=torch.long)
    for n in range(max_ngram, 1, -1):
        if len(tokens) <= n:
            continue
        windows = seq[:-1].unfold(0, n, 1)  # never match the tail against itself
        hits = (windows == seq[-n:]).all(dim=1).nonzero().flatten()
        if hits.numel():
            start = int(hits[-1]) + n
            return tokens[start : start + k]
    return []


class RapidDrafter:
    """RAPID's drafter: the RAG model, preceded by free n-gram lookup drafts from its own context."""

    def __init__(self, model_drafter: ModelDrafter, lookup: LookupDrafter | None) -> None:
        self.model_drafter = model_drafter
        self.lookup = lookup

    def propose(self, k: int, sampler: Sampler) -> Draft:
        if self.lookup is not None:
            draft = self.lookup.propose(k, sampler)
            if len(draft.tokens) >= 2:
                return draft
        return self.model_drafter.propose(k, sampler)

    def keep(self, n_output: int) -> None:
        self.model_drafter.keep(n_output)


Drafter = ModelDrafter | LookupDrafter | RapidDrafter
# (the drafter model, its prompt, capacity) -> a session with the prompt prefilled
DrafterPrefill = Callable[[LoadedModel, Prompt, int], Session]


def build_drafter(
    method: Method, target: Session, draft_model: LoadedModel | None, prompts: dict[Drafting, Prompt],
    settings: DecodingSettings, room: int, prefill_drafter: DrafterPrefill,
) -> Drafter | None:
    """The method's drafter over the target session; prompts maps a model drafting to what it reads."""
    if method.drafting is Drafting.NONE:
        return None
    if method.drafting is Drafting.LOOKUP:
        return LookupDrafter(target.tokens, settings.lookup_ngram)
    if method.drafting is Drafting.WINDOW:
        window = StreamingCache.from_prefix(target.cache, settings.magicdec_sinks, settings.magicdec_window, room)
        return ModelDrafter(Session(target.model, window, target.prompt, target.output))
    assert draft_model is not None
    prompt = prompts[method.drafting]
    model_drafter = ModelDrafter(prefill_drafter(draft_model, prompt, len(prompt) + room))
    if method.drafting is Drafting.LONG_MODEL:
        return model_drafter
    lookup = LookupDrafter(model_drafter.session.tokens, settings.lookup_ngram) if settings.lookup_in_rapid else None
    return RapidDrafter(model_drafter, lookup)
