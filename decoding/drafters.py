"""Who proposes tokens for the target to verify: one small class per kind of drafting.

Each drafter has `propose(k, sampler) -> Draft` and `keep(n_output)` (forget rejected drafts).
`build_drafter` picks one from the method table (decoding/methods.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from decoding.cache import KVCache, StreamingCache
from decoding.loaded_model import LoadedModel, Prompt
from decoding.methods import Drafting, Method
from decoding.quant import QuantLinear, dequantize
from decoding.session import Sampler, Session
from decoding.settings import DecodingSettings
from decoding.transformer import Transformer


@dataclass
class Draft:
    tokens: list[int] = field(default_factory=list)
    # Per token: the drafter's logits (model drafts) or None (lookup drafts: q is one-hot).
    logits: list[torch.Tensor | None] = field(default_factory=list)


@dataclass(frozen=True)
class TargetSlots:
    """What a focus drafter (the target on the retrieved passages of its own cache) reads."""

    slots: list[tuple[int, int]]  # the target cache's slots of the header and the passages
    question: int  # where the question starts: the drafter also keeps every slot from there on


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
            if i == k - 1 or self._unsure(self._scored(logits), sampler.settings.draft_confidence):
                break  # the last draft is fed with the next pass's pending tokens
            logits = self.session.forward([token])
        return draft

    def _scored(self, logits: torch.Tensor) -> torch.Tensor:
        """The logits of the tokens the drafter scores (the others are -inf: they add nothing)."""
        head = self.session.head
        return logits[head.ids] if isinstance(head, VocabularyHead) else logits

    @staticmethod
    def _unsure(logits: torch.Tensor, threshold: float) -> bool:
        return threshold > 0 and float(torch.softmax(logits, dim=-1).max()) < threshold

    def keep(self, n_output: int) -> None:
        self.session.keep(n_output)
        self.session.cache.after_commit()
        if isinstance(self.session.head, VocabularyHead):
            self.session.head.add(self.session.output)


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


class VocabularyHead(nn.Module):
    """A model's output layer restricted to some tokens; the others score -inf and are never drafted.

    Tokens the answer itself brings (the target chose one no prompt holds) join as they appear.
    """

    def __init__(self, model: Transformer, tokens: Iterable[int]) -> None:
        super().__init__()
        self.model = model
        self.members: set[int] = set()
        self.ids = torch.empty(0, dtype=torch.long, device=model.device)
        self.rows = torch.empty(0, model.args.dim, dtype=model.dtype, device=model.device)
        self.add(tokens)

    def add(self, tokens: Iterable[int]) -> None:
        new = sorted(set(tokens) - self.members)
        if not new:
            return
        self.members.update(new)
        ids = torch.tensor(new, dtype=torch.long)
        self.ids = torch.cat([self.ids, ids.to(self.model.device)])
        self.rows = torch.cat([self.rows, output_rows(self.model, ids)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.full((x.shape[0], self.model.args.vocab_size), float("-inf"), device=x.device)
        logits[:, self.ids] = F.linear(x, self.rows).float()
        return logits


def output_rows(model: Transformer, ids: torch.Tensor) -> torch.Tensor:
    """The output layer's rows for token ids, in the model's dtype (dequantized when quantized)."""
    head = model.lm_head
    if isinstance(head, nn.Linear):
        return head.weight.detach()[ids.to(head.weight.device)].to(model.dtype)
    assert isinstance(head, QuantLinear)
    rows, start = torch.empty(len(ids), head.in_features, dtype=model.dtype), 0
    for part in head.parts:
        inside = (ids >= start) & (ids < start + part.n)
        if inside.any():
            rows[inside] = dequantize(part, model.dtype, ids[inside] - start)
        start += part.n
    return rows.to(model.device)


def vocabulary_head(model: Transformer, tokens: Iterable[int]) -> VocabularyHead | None:
    """A head over `tokens`; None where the output layer keeps no readable rows (oneDNN-packed dense
    weights) or the tokens cover most of the vocabulary (nothing to save)."""
    tokens = set(tokens)
    if not isinstance(model.lm_head, (nn.Linear, QuantLinear)) or len(tokens) > model.args.vocab_size // 2:
        return None
    return VocabularyHead(model, tokens)


Drafter = ModelDrafter | LookupDrafter | RapidDrafter
# (the drafter model, its prompt, capacity) -> a session with the prompt prefilled
DrafterPrefill = Callable[[LoadedModel, Prompt, int], Session]


def build_drafter(
    method: Method, target: Session, draft_model: LoadedModel | None, prompts: dict[Drafting, Prompt],
    settings: DecodingSettings, room: int, prefill_drafter: DrafterPrefill, target_slots: TargetSlots | None = None,
    stop_ids: frozenset[int] = frozenset(),
) -> Drafter | None:
    """The method's drafter over the target session; prompts maps a model drafting to what it reads;
    target_slots: what a focus drafter keeps of the target's cache. With settings.draft_vocabulary a model
    drafter scores only the tokens of the target's prompt, of those prompts and `stop_ids`."""
    if method.drafting is Drafting.NONE:
        return None
    if method.drafting is Drafting.LOOKUP:
        return LookupDrafter(target.tokens, settings.lookup_ngram)
    if method.drafting is Drafting.WINDOW:
        cache = StreamingCache.from_prefix(target.cache, settings.magicdec_sinks, settings.magicdec_window, room)
        session = Session(target.model, cache, target.prompt, target.output, run=target.run, drafting=True)
    elif method.drafting is Drafting.FOCUS:
        assert target_slots is not None
        # The question's slots too, as the target read it (it attended to every document): re-reading
        # it over the passages alone measured worse answers at eta > 0 (README, Answer quality).
        slots = [*target_slots.slots, (target_slots.question, target.cache.length)]
        cache = KVCache.gather(target.cache, slots, room, target.cache.next_position)
        session = Session(target.model, cache, target.prompt, target.output, run=target.run, drafting=True)
    else:
        assert draft_model is not None
        prompt = prompts[method.drafting]
        session = prefill_drafter(draft_model, prompt, len(prompt) + room)
    if settings.draft_vocabulary:
        prompted = (token for prompt in prompts.values() if prompt is not None for token in prompt.tokens)
        session.head = vocabulary_head(session.model, [*target.prompt, *prompted, *stop_ids])
    model_drafter = ModelDrafter(session)
    if method.drafting is not Drafting.RAG_MODEL:
        return model_drafter
    lookup = LookupDrafter(model_drafter.session.tokens, settings.lookup_ngram) if settings.lookup_in_rapid else None
    return RapidDrafter(model_drafter, lookup)
