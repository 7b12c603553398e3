"""The decoding loop: prefill, draft, verify, accept - shared by every method.

Reads like gpt-fast's generate.py: small functions with explicit positions. Each model reads its
own prompt in a Session; answer tokens are shared. A Session's cache always lags its tokens by at
least one (the token chosen last is fed at the start of the next pass), so every pass both feeds
the newest token and yields fresh logits.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from decoding.cache import KVCache, StreamingCache
from decoding.model import Transformer
from decoding.models import LoadedModel, Prompt
from decoding.sampling import (
    accept_probability,
    greedy_choice,
    probabilities,
    residual,
    retrieval_augmented,
    sample,
)
from decoding.settings import DecodingSettings
from decoding.stats import Stats

# (model, prompt prefix tokens, capacity) -> a cache of at least that capacity holding exactly that
# prefix, for the caller's use alone until its next load; or None to prefill the prefix.
PrefixLoader = Callable[[Transformer, list[int], int], KVCache | None]
PrefixSaver = Callable[[Transformer, list[int], KVCache], None]


@dataclass(frozen=True)
class PrefixCacheHooks:
    load: PrefixLoader
    save: PrefixSaver


@dataclass
class Session:
    """One model reading one prompt followed by the shared answer tokens."""

    model: Transformer
    cache: KVCache
    prompt: list[int]
    output: list[int]  # shared with the other session: the committed answer tokens

    def tokens(self) -> list[int]:
        return self.prompt + self.output

    def pending(self) -> list[int]:
        return self.tokens()[self.cache.next_position :]

    def forward(self, tokens: list[int], all_logits: bool = False) -> torch.Tensor:
        ids = torch.tensor(tokens, dtype=torch.long, device=self.model.device)
        return self.model.forward(ids, self.cache, all_logits=all_logits)

    def rewind(self, n_positions: int) -> None:
        """Drop rejected drafts: keep the first n_positions tokens (if the cache holds that many)."""
        self.cache.crop(min(self.cache.next_position, n_positions))


@dataclass
class Draft:
    tokens: list[int] = field(default_factory=list)
    # Per token: the drafter's logits (model drafts) or None (lookup drafts: q is one-hot).
    logits: list[torch.Tensor | None] = field(default_factory=list)


@dataclass
class Sampler:
    settings: DecodingSettings
    generator: torch.Generator

    @property
    def greedy(self) -> bool:
        return self.settings.temperature == 0

    def choose(self, logits: torch.Tensor) -> int:
        if self.greedy:
            return int(logits.argmax())
        return sample(probabilities(logits, self.settings.temperature, self.settings.top_p), self.generator)


# ----------------------------------------------------------------------------------- drafters


class ModelDrafter:
    """Drafts with a language model on its own context (RAG drafter, SD drafter, MagicDec window)."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def propose(self, k: int, sampler: Sampler) -> Draft:
        draft = Draft()
        logits = self.session.forward(self.session.pending())
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

    def commit(self, n_output: int) -> None:
        """Keep the prompt and the first n_output answer tokens in the drafter's cache."""
        self.session.rewind(len(self.session.prompt) + n_output)
        self.session.cache.after_commit()


class LookupDrafter:
    """Prompt-lookup drafting: continue the latest earlier occurrence of the answer's last n-gram."""

    def __init__(self, source: Callable[[], list[int]], max_ngram: int) -> None:
        self.source = source
        self.max_ngram = max_ngram

    def propose(self, k: int, sampler: Sampler) -> Draft:
        tokens = self.source()
        continuation = lookup_continuation(tokens, self.max_ngram, k)
        return Draft(continuation, [None] * len(continuation))

    def commit(self, n_output: int) -> None:
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

    def commit(self, n_output: int) -> None:
        self.model_drafter.commit(n_output)


Drafter = ModelDrafter | LookupDrafter | RapidDrafter

# ------------------------------------------------------------------------------- one pass


def verify(target: Session, draft: Draft) -> torch.Tensor:
    """One target pass over pending + drafted tokens; rows j.. score drafts 0.., last row = bonus."""
    pending = target.pending()
    logits = target.forward(pending + draft.tokens, all_logits=True)
    return logits[len(pending) - 1 :]


def accept(draft: Draft, target_logits: torch.Tensor, sampler: Sampler, eta: float) -> list[int]:
    """Accepted drafts followed by the target's own next token (replacement or bonus)."""
    s = sampler.settings
    out: list[int] = []
    for i, token in enumerate(draft.tokens):
        z, q_logits = target_logits[i], draft.logits[i]
        # Lookup drafts carry no drafter distribution: nothing to distill, so eta does not apply.
        token_eta = eta if q_logits is not None else 0.0
        if sampler.greedy:
            choice = greedy_choice(z, q_logits, token_eta, s.tail_guard)
            if choice != token:
                return [*out, choice]
        else:
            p = probabilities(z, s.temperature, s.top_p)
            q = probabilities(q_logits, s.temperature, s.top_p) if q_logits is not None else one_hot(token, p)
            p_hat = retrieval_augmented(p, q, token_eta, s.tail_guard)
            u = float(torch.rand((), generator=sampler.generator))
            if u > accept_probability(token, p_hat, q):
                return [*out, sample(residual(p, p_hat, q), sampler.generator)]
        out.append(token)
    return [*out, sampler.choose(target_logits[len(draft.tokens)])]


def one_hot(token: int, like: torch.Tensor) -> torch.Tensor:
    q = torch.zeros_like(like)
    q[token] = 1.0
    return q


# ----------------------------------------------------------------------------------- the loop


@dataclass(frozen=True)
class TextDelta:
    text: str


@dataclass(frozen=True)
class PassStats:
    stats: Stats


@dataclass(frozen=True)
class Finished:
    text: str
    token_ids: list[int]
    stats: Stats


GenerationEvent = TextDelta | PassStats | Finished


class Detokenizer:
    """Turns the growing answer into text deltas, holding back incomplete UTF-8 sequences."""

    def __init__(self, model: LoadedModel) -> None:
        self.model = model
        self.text = ""

    def delta(self, ids: list[int]) -> str:
        full = self.model.decode(ids)
        if full.endswith("\ufffd") or not full.startswith(self.text):
            return ""
        piece, self.text = full[len(self.text) :], full
        return piece


def prefill(
    model: Transformer, prompt: Prompt, hooks: PrefixCacheHooks | None, capacity: int
) -> tuple[KVCache, torch.Tensor, bool]:
    """Prefix (header, then each document) then suffix (question), always as separate prefills.

    Splitting the same way with or without the prefix cache keeps both paths bit-identical. A cache
    of `capacity` slots is allocated only when the prefix is not restored. Returns the cache, the
    logits after the prompt and whether the prefix came from the prefix cache.
    """
    restored = hooks.load(model, prompt.prefix, capacity) if hooks and prompt.prefix else None
    cache = restored if restored is not None else model.new_cache(capacity)
    if restored is None and prompt.prefix:
        for part in prompt.prefix_parts():
            model.prefill(torch.tensor(part, device=model.device), cache)
        if hooks:
            hooks.save(model, prompt.prefix, cache)
    logits = model.prefill(torch.tensor(prompt.suffix, device=model.device), cache)
    return cache, logits, restored is not None


def decode(
    target: Session,
    make_drafter: Callable[[], Drafter | None],
    first_logits: torch.Tensor,
    stats: Stats,
    settings: DecodingSettings,
    sampler: Sampler,
    eta: float,
    stop_ids: frozenset[int],
    detokenizer: Detokenizer,
) -> Iterator[GenerationEvent]:
    """Emit tokens until a stop token or max_new_tokens; speculative when make_drafter gives a drafter.

    The first token comes from the target's prefill logits alone, so the drafter (and its own
    prefill) is built only after that token is out: it never delays the first token. Its build
    time counts as prefill, not decode.
    """
    output = target.output
    start = time.perf_counter()
    proposed = [sampler.choose(first_logits)]
    stats.target_passes += 1
    drafter: Drafter | None = None
    while True:
        emitted = 0
        for token in proposed:
            if token in stop_ids:
                stats.finish_reason = "eos"
                emitted += 1  # the stop token was produced by this pass too (LC's length per pass is 1)
                break
            output.append(token)
            emitted += 1
            stats.token_times.append(time.perf_counter() - start)
            if len(output) >= settings.max_new_tokens:
                stats.finish_reason = "length"
                break
        stats.generated = len(output)
        stats.accepted_lengths.append(emitted)
        stats.decode_s = time.perf_counter() - start
        if stats.target_passes == 1:  # prefill_s holds the target's prefill alone at this point
            stats.first_token_s = stats.prefill_s + stats.decode_s
        if piece := detokenizer.delta(output):
            yield TextDelta(piece)
        yield PassStats(stats)
        if stats.finish_reason:
            return
        if stats.target_passes == 1:
            building = time.perf_counter()
            drafter = make_drafter()
            spent = time.perf_counter() - building
            stats.prefill_s += spent
            start += spent
        k = min(settings.gamma, settings.max_new_tokens - len(output) - 1)  # the target adds one more
        draft = drafter.propose(k, sampler) if drafter is not None and k >= 1 else Draft()
        stats.target_passes += 1
        if not draft.tokens:  # no drafter, no room, or lookup found nothing: a plain target step
            proposed = [sampler.choose(target.forward(target.pending()))]
            continue
        proposed = accept(draft, verify(target, draft), sampler, eta)
        n_accepted = len(proposed) - 1
        stats.drafted += len(draft.tokens)
        stats.accepted += n_accepted
        kept = len(output) + n_accepted  # answer tokens both caches may keep; the rest were rejected
        target.rewind(len(target.prompt) + kept)
        drafter.commit(kept)


def run_to_end(events: Iterator[GenerationEvent]) -> Finished:
    """Consume a generation and return its Finished event (tests, benchmarks)."""
    finished = [e for e in events if isinstance(e, Finished)]
    return finished[-1]


def generate(
    method: str,
    target: LoadedModel,
    drafter: LoadedModel | None,
    long_prompt: Prompt,
    rag_prompt: Prompt | None,
    settings: DecodingSettings,
    prefix_cache: PrefixCacheHooks | None = None,
    rag_prefix: PrefixCacheHooks | None = None,
) -> Iterator[GenerationEvent]:
    """Run one method; yields text deltas as tokens are accepted, stats per pass, then Finished.

    prefix_cache serves the document prefix of the long prompt; rag_prefix, when given, serves the
    RAG drafter's prompt prefix (its retrieved passages).
    """
    settings.validate()
    if method in ("rag", "rapid") and rag_prompt is None:
        raise ValueError(f"method {method!r} needs a retrieved (RAG) prompt")
    sampler = Sampler(settings, torch.Generator().manual_seed(settings.seed))
    prompt = rag_prompt if method == "rag" and rag_prompt is not None else long_prompt
    stats = Stats(method=method, context_tokens=len(prompt))
    output: list[int] = []
    room = settings.max_new_tokens + settings.gamma + 2

    t0 = time.perf_counter()
    hooks = prefix_cache if method != "rag" else None
    cache, logits, restored = prefill(target.model, prompt, hooks, len(prompt) + room)
    session = Session(target.model, cache, prompt.tokens, output)
    stats.prefix_cached_tokens = len(prompt.prefix) if restored else 0
    stats.prefill_s = time.perf_counter() - t0

    def make_drafter() -> Drafter | None:
        return _make_drafter(method, session, target, drafter, long_prompt, rag_prompt, settings, stats, room,
                             prefix_cache, rag_prefix)

    eta = settings.eta if method == "rapid" else 0.0
    yield from decode(session, make_drafter, logits, stats, settings, sampler, eta, target.stop_ids,
                      Detokenizer(target))
    yield Finished(target.decode(output), list(output), stats)


def _make_drafter(
    method: str,
    target_session: Session,
    target: LoadedModel,
    drafter: LoadedModel | None,
    long_prompt: Prompt,
    rag_prompt: Prompt | None,
    settings: DecodingSettings,
    stats: Stats,
    room: int,
    prefix_cache: PrefixCacheHooks | None,
    rag_prefix: PrefixCacheHooks | None,
) -> Drafter | None:
    if method in ("lc", "rag"):
        return None
    if method == "lookup":
        return LookupDrafter(target_session.tokens, settings.lookup_ngram)
    if method == "magicdec":
        window = StreamingCache.from_prefix(
            target_session.cache, settings.magicdec_sinks, settings.magicdec_window, spare=room
        )
        return ModelDrafter(Session(target.model, window, target_session.prompt, target_session.output))
    draft_model = drafter or target
    if draft_model is not target and draft_model.tokenizer.get_vocab() != target.tokenizer.get_vocab():
        raise ValueError("the drafter and the target must share one tokenizer (same vocabulary ids)")
    draft_prompt = long_prompt if method == "sd" else rag_prompt
    assert draft_prompt is not None

    # SD's drafter reads the whole documents too, so its prefix is worth caching; RAPID's retrieved
    # context changes with every question, so only rag_prefix (built from per-chunk KV) serves it.
    # (With self-speculation the target already holds that prefix's cache object: no sharing.)
    reuse = method == "sd" and draft_model is not target
    hooks = prefix_cache if reuse else rag_prefix if method == "rapid" else None
    cache, _, _ = prefill(draft_model.model, draft_prompt, hooks, len(draft_prompt) + room)
    session = Session(draft_model.model, cache, draft_prompt.tokens, target_session.output)
    stats.draft_context_tokens = len(draft_prompt)
    model_drafter = ModelDrafter(session)
    if method == "sd":
        return model_drafter
    lookup = LookupDrafter(session.tokens, settings.lookup_ngram) if settings.lookup_in_rapid else None
    return RapidDrafter(model_drafter, lookup)
