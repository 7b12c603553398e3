"""The decoding loop shared by every method: prefill, draft, verify, accept.

Reads like gpt-fast's generate.py: small functions with explicit positions (decoding/session.py)
and one statistics record (decoding/stats.py). What differs between methods - which prompt the
target reads, who drafts, whether eta applies - comes from the table in decoding/methods.py.
"""

from __future__ import annotations

import filecmp
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace

import torch

from decoding.drafters import Draft, Drafter, TargetSlots, build_drafter
from decoding.engine_info import engine_description
from decoding.loaded_model import LoadedModel, Prompt
from decoding.methods import Drafting, method_info
from decoding.prefill import PrefixCacheHooks, prefill
from decoding.sampling import accept_probability, greedy_choice, probabilities, residual, retrieval_augmented, sample
from decoding.session import Sampler, Session
from decoding.settings import DecodingSettings
from decoding.stats import Stats
from decoding.transformer import Run, Transformer, run_alone


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
TOKENIZER_FILE = "tokenizer.json"
# (target, the model whose passes drafting costs or None, longest draft, acceptance) -> draft length
DraftPlanner = Callable[[Transformer, Transformer | None, int, float], int]


# ------------------------------------------------------------------------------ the steps


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


def commit(output: list[int], proposed: list[int], settings: DecodingSettings,
           stop_ids: frozenset[int]) -> tuple[int, str]:
    """Append proposed tokens to the answer up to a stop token or the length limit.

    Returns how many tokens this pass produced (a closing stop token counts: it came from this pass
    too) and the finish reason ("" while the answer goes on).
    """
    for n, token in enumerate(proposed, start=1):
        if token in stop_ids:
            return n, "eos"
        output.append(token)
        if len(output) >= settings.max_new_tokens:
            return n, "length"
    return len(proposed), ""


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


# ------------------------------------------------------------------------------- the loop


# (longest draft, acceptance so far) -> the draft length to use now (a scheduler's choice at batch > 1)
DraftLength = Callable[[int, float], int]


class DrafterBuild:
    """A drafter built in a thread of its own (its chunk KV read and assembled, its prompt read,
    its output layer cut down) while the target goes on with plain steps."""

    def __init__(self, make_drafter: Callable[[], Drafter | None]) -> None:
        self._drafter: Drafter | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._build, args=(make_drafter,), name="rapidqa-drafter-build",
                                        daemon=True)
        self._thread.start()

    def _build(self, make_drafter: Callable[[], Drafter | None]) -> None:
        try:
            self._drafter = make_drafter()
        except BaseException as error:  # raised in the session's thread, by result()
            self._error = error

    def ready(self) -> bool:
        return not self._thread.is_alive()

    def result(self) -> Drafter | None:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._drafter


def emit_tokens(
    target: Session, make_drafter: Callable[[], Drafter | None], first_logits: torch.Tensor, sampler: Sampler,
    eta: float, stop_ids: frozenset[int], stats: Stats, detokenizer: Detokenizer,
    draft_length: DraftLength | None = None, build_aside: bool = False,
) -> Iterator[GenerationEvent]:
    """Emit tokens until a stop token or max_new_tokens; speculative when make_drafter gives a drafter.

    The first token comes from the target's prefill logits alone, so the drafter (and its own
    prefill) is built only after that token is out: it never delays the first token. Its build
    time counts as prefill, not decode. With build_aside the drafter is built in a thread while
    the target takes plain steps, and drafting starts once it is ready: the second token then
    comes one target step after the first. Only for greedy decoding (plain steps and verifies pick
    the same tokens, so when the drafter arrives changes nothing) and where a scheduler runs the
    passes (the two threads' passes then take turns instead of running at once).
    """
    settings, output = sampler.settings, target.output
    start = first_out = time.perf_counter()
    proposed = [sampler.choose(first_logits)]
    drafter: Drafter | None = None
    building: DrafterBuild | None = None
    while True:
        emitted, stats.finish_reason = commit(output, proposed, settings, stop_ids)
        clock = time.perf_counter()
        now = clock - start
        if stats.target_passes == 0:
            first_out = clock
        elif stats.generated == 1:
            stats.second_token_s = clock - first_out
        stats.token_times.extend([now] * (len(output) - stats.generated))
        stats.record_pass(emitted, len(output), now)
        # Only the engine's work is timed: while suspended at these yields the consumer runs (the UI
        # renders the chat and plot), and that time must not count as decoding.
        suspended = time.perf_counter()
        if piece := detokenizer.delta(output):
            yield TextDelta(piece)
        yield PassStats(stats)
        away = time.perf_counter() - suspended
        start += away
        first_out += away
        if stats.finish_reason:
            if building is not None:
                building.result()  # nothing keeps running for an answer that ended
            return
        if stats.target_passes == 1 and build_aside:
            building = DrafterBuild(make_drafter)
        elif stats.target_passes == 1:
            began = time.perf_counter()
            drafter = make_drafter()
            spent = time.perf_counter() - began
            stats.prefill_s += spent
            start += spent
        if building is not None and building.ready():
            drafter, building = building.result(), None
            if drafter is not None:
                drafter.keep(len(output))  # the answer so far joins what it scores
        k = min(settings.gamma, settings.max_new_tokens - len(output) - 1)  # the target adds one more
        if drafter is not None and k >= 1 and draft_length is not None:
            k = draft_length(k, (stats.accepted + 1) / (stats.drafted + 2))
            stats.draft_lengths.append(k)
        draft = drafter.propose(k, sampler) if drafter is not None and k >= 1 else Draft()
        if not draft.tokens:  # no drafter, no room, or lookup found nothing: a plain target step
            proposed = [sampler.choose(target.step())]
            continue
        proposed = accept(draft, verify(target, draft), sampler, eta)
        stats.record_draft(len(draft.tokens), len(proposed) - 1)
        kept = len(output) + len(proposed) - 1  # answer tokens both caches may keep; the rest were rejected
        target.keep(kept)
        drafter.keep(kept)


def run_to_end(events: Iterator[GenerationEvent]) -> Finished:
    """Consume a generation and return its Finished event (tests, benchmarks)."""
    finished = [e for e in events if isinstance(e, Finished)]
    return finished[-1]


def generate(
    method: str,
    target: LoadedModel,
    draft_model: LoadedModel | None,
    long_prompt: Prompt,
    rag_prompt: Prompt | None,
    settings: DecodingSettings,
    prefix_hooks: PrefixCacheHooks | None = None,
    rag_prefix: PrefixCacheHooks | None = None,
    passage_spans: Sequence[tuple[int, int]] | None = None,
    run: Run = run_alone,
    plan: DraftPlanner | None = None,
) -> Iterator[GenerationEvent]:
    """Run one method; yields text deltas as tokens are accepted, stats per pass, then Finished.

    prefix_hooks serve the document prefix of the long prompt; rag_prefix, when given, serves the
    RAG prompt's prefix (its retrieved passages) to whoever reads it: the RAG drafter, or the target
    of a method that reads the passages (rag); passage_spans: where the retrieved passages lie in
    the long prompt's prefix, as token ranges (a focus drafter reads those slots of the target's cache).
    run: who runs every model pass (decoding/scheduler.py batches them with other sessions').
    plan: chooses each draft's length (decoding/scheduler.py Ticket.draft_length); default, gamma.
    """
    settings.validate()
    info = method_info(method)
    if info.needs_rag_prompt and rag_prompt is None:
        raise ValueError(f"method {method!r} needs a retrieved (RAG) prompt")
    if info.drafting is Drafting.FOCUS and passage_spans is None:
        raise ValueError(f"method {method!r} needs where the retrieved passages lie in the long prompt")
    prompt = rag_prompt if info.target_reads_rag and rag_prompt is not None else long_prompt
    stats = Stats(method=method, context_tokens=len(prompt), engine=engine_description(target))
    room = settings.max_new_tokens + settings.gamma + 2
    # The model that drafts (None: lookup or no drafting); without a separate drafter, the target.
    drafting_model = None
    if info.drafts_with_model:
        drafting_model = target if info.drafter_is_target else draft_model or target
    # Every reader's window, before any token: a drafter is built only after the first one.
    target.check_fits("The prompt", len(prompt), room)
    if drafting_model is not None:
        read = rag_prompt if info.drafting is Drafting.RAG_MODEL else long_prompt
        assert read is not None
        drafting_model.check_fits("The drafter's prompt", len(read), room)

    # The documents' prefix from the prefix cache; a target reading the retrieved passages reads
    # them through rag_prefix (their per-chunk KV) when given.
    target_hooks = prefix_hooks if info.uses_prefix_cache else rag_prefix if info.target_reads_rag else None
    t0 = time.perf_counter()
    cache, logits, restored = prefill(target.model, prompt, target_hooks, len(prompt) + room, run)
    session = Session(target.model, cache, prompt.tokens, [], run=run)
    stats.prefix_cached_tokens = restored
    stats.prefill_s = time.perf_counter() - t0

    sampler = Sampler.seeded(settings)
    build_aside = sampler.greedy and run is not run_alone and drafting_model is not None

    def make_drafter() -> Drafter | None:
        if drafting_model is not None and drafting_model is not target:
            check_same_vocabulary(target, drafting_model)
        prompts = {Drafting.RAG_MODEL: rag_prompt, Drafting.LONG_MODEL: long_prompt}
        if info.drafting is Drafting.LONG_MODEL:
            # With self-speculation the target has just read this prefix itself: no second restore.
            hooks = prefix_hooks if drafting_model is not target else None
        else:
            hooks = rag_prefix
        # Built aside, its prompt's passes go first like any draft's: behind other sessions' target
        # passes it would wait until they all ended.
        read_prompt = drafter_prefill(session, stats, hooks, drafting_passes(run) if build_aside else run)
        reads = None
        if info.drafting is Drafting.FOCUS:
            reads = TargetSlots(passage_slots(long_prompt, passage_spans or ()), len(long_prompt.prefix))
            stats.draft_context_tokens = sum(end - start for start, end in reads.slots) + len(long_prompt.suffix)
        return build_drafter(info, session, drafting_model, prompts, settings, room, read_prompt, reads,
                             target.stop_ids)

    eta = settings.eta if info.eta_applies else 0.0
    draft_length = None
    if plan is not None:
        # The model whose passes a draft costs: the drafting model, the target drafting for itself
        # (a window or its own passages), none for lookup.
        drafts_on = drafting_model.model if drafting_model is not None else None
        if info.drafting in (Drafting.WINDOW, Drafting.FOCUS):
            drafts_on = target.model

        def draft_length(longest: int, acceptance: float) -> int:
            return plan(target.model, drafts_on, longest, acceptance)

    yield from emit_tokens(session, make_drafter, logits, sampler, eta, target.stop_ids, stats,
                           Detokenizer(target), draft_length, build_aside)
    yield Finished(target.decode(session.output), list(session.output), stats)


def passage_slots(prompt: Prompt, spans: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """The slots a focus drafter keeps of the target's prefix: its header and the given token ranges
    (clipped to the documents, merged)."""
    header, documents_end = len(prompt.header), len(prompt.prefix)
    slots = [(0, header)]
    for start, end in sorted(spans):
        start, end = max(start, header), min(end, documents_end)
        if start >= end:
            continue
        if start <= slots[-1][1]:
            slots[-1] = (slots[-1][0], max(slots[-1][1], end))
        else:
            slots.append((start, end))
    return [(start, end) for start, end in slots if end > start]


def check_same_vocabulary(target: LoadedModel, drafter: LoadedModel) -> None:
    # Two models shipped with byte-identical tokenizer files share their vocabulary: a file compare
    # takes milliseconds, the vocabulary key most of a second per model (holding the interpreter
    # lock, so the answer's steps would wait on a drafter built aside).
    if same_tokenizer_file(target, drafter):
        return
    if drafter.vocabulary_key != target.vocabulary_key:
        raise ValueError("the drafter and the target must share one tokenizer (same vocabulary ids)")


def drafter_prefill(
    target_session: Session, stats: Stats, hooks: PrefixCacheHooks | None, run: Run
) -> Callable[[LoadedModel, Prompt, int], Session]:
    """How a model drafter reads its prompt (its passes run by `run`): through the given hooks (SD's
    document prefix from the prefix cache, RAPID's retrieved passages from per-chunk KV), otherwise
    a plain prefill."""

    def read(draft_model: LoadedModel, prompt: Prompt, capacity: int) -> Session:
        cache, _, _ = prefill(draft_model.model, prompt, hooks, capacity, run)
        stats.draft_context_tokens = len(prompt)
        return Session(draft_model.model, cache, prompt.tokens, target_session.output, run=target_session.run,
                       drafting=True)

    return read


def drafting_passes(run: Run) -> Run:
    """`run` with every pass marked as a drafter's: a scheduler runs those first."""
    return lambda model, rows: run(model, replace(rows, drafting=True))


def same_tokenizer_file(a: LoadedModel, b: LoadedModel) -> bool:
    """Whether both models were loaded with byte-identical tokenizer.json files."""
    if a.directory is None or b.directory is None:
        return False
    files = [a.directory / TOKENIZER_FILE, b.directory / TOKENIZER_FILE]
    return all(f.is_file() for f in files) and filecmp.cmp(files[0], files[1], shallow=False)
