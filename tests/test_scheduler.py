"""The scheduler: many sessions' passes batched, each session's tokens those it gets alone.

Tiny models on the production paths (the C attention kernel and the torch path); the real models'
version is in tests/test_serving_real.py.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch

from decoding.cache import KV_BLOCK, KVCache
from decoding.generate import Finished, generate, run_to_end
from decoding.loaded_model import Prompt
from decoding.pass_costs import Others, PassCosts, best_draft_length
from decoding.prefix_cache import PrefixCache
from decoding.scheduler import Cancelled, Scheduler
from decoding.settings import DecodingSettings
from decoding.transformer import PREFILL_CHUNK, Rows
from tests.test_decoding_tiny import assert_drafted_and_sometimes_wrong, passage_spans_of
from tests.tiny import EXACT_VOCAB, random_prompt

METHODS = ("lc", "rapid", "lookup", "sd", "magicdec", "rapid-focus", "rapid-self")


def settings(method: str, **overrides) -> DecodingSettings:
    # MagicDec's window drops part of every prompt here, so its drafts are sometimes wrong.
    return DecodingSettings(method=method, **({"max_new_tokens": 40, "gamma": 4, "magicdec_window": 200,
                                              "magicdec_sinks": 4} | overrides))


def solo(method: str, target, drafter, prompt: Prompt, rag: Prompt, hooks=None) -> Finished:
    return run_to_end(generate(method, target, drafter, prompt, rag, settings(method), hooks,
                               passage_spans=passage_spans_of(prompt)))


class Session(threading.Thread):
    """One question decoded through the scheduler in a thread of its own, as app/worker.py runs it."""

    def __init__(self, scheduler: Scheduler, method: str, target, drafter, prompt: Prompt, rag: Prompt,
                 hooks=None, start_after: threading.Event | None = None, cancel_after: int | None = None,
                 plan: bool = False) -> None:
        super().__init__(daemon=True)
        self.args = scheduler, method, target, drafter, prompt, rag, hooks
        self.plan = plan
        self.start_after, self.cancel_after = start_after, cancel_after
        self.result: Finished | None = None
        self.cancelled = False
        self.tokens_seen = 0
        self.first_pass = threading.Event()

    def run(self) -> None:
        scheduler, method, target, drafter, prompt, rag, hooks = self.args
        if self.start_after is not None:
            self.start_after.wait(30)
        with scheduler.session(method) as ticket:
            assert ticket is not None
            events = generate(method, target, drafter, prompt, rag, settings(method), hooks,
                              passage_spans=passage_spans_of(prompt), run=ticket.run,
                              plan=ticket.draft_length if self.plan else None)
            try:
                for event in events:
                    self.first_pass.set()
                    if isinstance(event, Finished):
                        self.result = event
                    elif self.cancel_after is not None:
                        self.tokens_seen += 1
                        if self.tokens_seen >= self.cancel_after:
                            ticket.cancel()
            except Cancelled:
                self.cancelled = True


def prompts(length: int, seed: int) -> tuple[Prompt, Prompt]:
    prompt = random_prompt(length, seed=seed, vocab=EXACT_VOCAB)
    return prompt, Prompt(prompt.prefix[length // 4 :], prompt.suffix)


def lookup_inputs(target, length: int, first_seed: int) -> tuple[Prompt, Prompt]:
    """A prompt on which prompt lookup drafts, right and wrong: it drafts only where the answer repeats
    an n-gram of the prompt, so prompts are tried seed by seed (as check_lookup_exact does)."""
    for seed in range(first_seed, first_seed + 12):
        inputs = prompts(length, seed=seed)
        out = solo("lookup", target, None, *inputs)
        if 0 < out.stats.accepted < out.stats.drafted:
            return inputs
    pytest.fail("no prompt tried made lookup draft and be sometimes wrong")


def test_batched_sessions_get_their_solo_tokens(small_vocab_pair, attention: str) -> None:
    """Every method side by side, one joining mid-stream and one cancelled: each of the others returns
    exactly what it returns alone, and the passes really were shared."""
    target, drafter = small_vocab_pair
    scheduler = Scheduler(max_sessions=len(METHODS) + 2)
    inputs = {method: prompts(300 + 37 * i, seed=i) for i, method in enumerate(METHODS)}
    inputs["lookup"] = lookup_inputs(target, 300 + 37 * METHODS.index("lookup"), METHODS.index("lookup"))
    alone = {method: solo(method, target, drafter, *inputs[method]) for method in METHODS}
    first = Session(scheduler, "lc", target, drafter, *inputs["lc"])
    sessions = [Session(scheduler, method, target, drafter, *inputs[method]) for method in METHODS[1:]]
    late = Session(scheduler, "rapid", target, drafter, *inputs["rapid"], start_after=first.first_pass)
    stopped = Session(scheduler, "sd", target, drafter, *inputs["sd"], cancel_after=6)
    everyone = [first, *sessions, late, stopped]
    for session in everyone:
        session.start()
    for session in everyone:
        session.join(120)
        assert not session.is_alive()
    for method, session in zip(METHODS, [first, *sessions], strict=True):
        assert session.result is not None, method
        assert session.result.token_ids == alone[method].token_ids, method
        if method != "lc":
            assert_drafted_and_sometimes_wrong(session.result, method)
    assert late.result is not None and late.result.token_ids == alone["rapid"].token_ids
    assert stopped.cancelled and stopped.result is None
    assert scheduler.largest_batch >= 3, scheduler.largest_batch
    assert scheduler.active_sessions() == 0


def test_planned_draft_lengths_keep_the_solo_tokens(small_vocab_pair) -> None:
    """With the scheduler choosing each draft's length from measured pass costs, the tokens stay the
    same: only how fast they come changes."""
    target, drafter = small_vocab_pair
    scheduler = Scheduler(max_sessions=4)
    methods = ("rapid", "sd", "lookup", "lc")
    inputs = {method: prompts(400 + 11 * i, seed=20 + i) for i, method in enumerate(methods)}
    sessions = [Session(scheduler, m, target, drafter, *inputs[m], plan=True) for m in methods]
    for session in sessions:
        session.start()
    for session in sessions:
        session.join(120)
    for method, session in zip(methods, sessions, strict=True):
        assert session.result is not None
        assert session.result.token_ids == solo(method, target, drafter, *inputs[method]).token_ids, method
    assert any(s.result is not None and s.result.stats.draft_lengths for s in sessions)


def test_sessions_share_one_copy_of_a_stored_prefix(small_vocab_pair, attention: str, tmp_path: Path) -> None:
    """Prefixes longer than a kernel block are handed out as a shared read-only base: sessions on it
    read the same memory, write only their own slots, and decode what they decode without the cache."""
    target, drafter = small_vocab_pair
    prompt, rag = prompts(3 * KV_BLOCK + 100, seed=7)
    cache = PrefixCache(tmp_path, {})
    stored = target.model.new_cache(len(prompt.prefix) + 1)
    target.model.prefill(torch.tensor(prompt.prefix), stored)
    cache.save(target.model, prompt.prefix, stored, prompt.cuts())
    loaded = [cache.load(target.model, prompt.prefix, len(prompt) + 64) for _ in range(2)]
    assert all(isinstance(c, KVCache) and c.offset == 3 * KV_BLOCK for c in loaded)
    assert loaded[0].base == loaded[1].base  # one copy in memory
    assert loaded[0].keys[0].data_ptr() != loaded[1].keys[0].data_ptr()  # own slots apart
    scheduler = Scheduler(max_sessions=4)
    methods = ("lc", "rapid", "lookup", "sd")
    sessions = [Session(scheduler, method, target, drafter, prompt, rag, hooks=cache.hooks(prompt.cuts()))
                for method in methods]
    for session in sessions:
        session.start()
    for session in sessions:
        session.join(120)
    reference = solo("lc", target, drafter, prompt, rag)  # no prefix cache: a private contiguous cache
    for method, session in zip(methods, sessions, strict=True):
        assert session.result is not None and session.result.token_ids == reference.token_ids, method
        assert session.result.stats.prefix_cached_tokens == len(prompt.prefix)


def test_a_stopped_session_leaves_at_its_next_pass(small_vocab_pair) -> None:
    target, drafter = small_vocab_pair
    prompt, rag = prompts(2000, seed=3)
    scheduler = Scheduler(max_sessions=2)
    session = Session(scheduler, "lc", target, drafter, prompt, rag, cancel_after=1)
    session.start()
    session.join(60)
    assert session.cancelled and not session.is_alive()
    deadline = time.monotonic() + 5
    while scheduler.active_sessions() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert scheduler.active_sessions() == 0


def test_a_full_scheduler_makes_the_next_session_wait() -> None:
    scheduler = Scheduler(max_sessions=1)
    with scheduler.session("first") as first:
        assert first is not None
        with scheduler.session("second", timeout=0.05) as second:
            assert second is None
    with scheduler.session("third", timeout=0.05) as third:
        assert third is not None


def test_draft_length_follows_the_cost_of_rows() -> None:
    """Alone, or before anything is measured, a session drafts the configured length. In a batch it
    drafts less the more a pass's rows cost: fully where extra rows are free, less as sessions add up
    where they are not; lookup drafts, which cost no pass, are never shorter than model drafts."""
    def costs_of(per_row: float) -> tuple[PassCosts, torch.nn.Module, torch.nn.Module]:
        costs, target, drafter = PassCosts(), torch.nn.Linear(1, 1), torch.nn.Linear(1, 1)
        for rows in (1, 8, 16, 64):
            costs.record(target, rows, 0.025 + per_row * rows)
        for rows in (1, 8):
            costs.record(drafter, rows, 0.008 + 0.0005 * rows)
        return costs, target, drafter

    steep, target, drafter = costs_of(0.004)
    assert best_draft_length(PassCosts(), target, drafter, 6, 0.8, Others(3, 3)) == 6
    assert best_draft_length(steep, target, drafter, 6, 0.8, Others(0, 0)) == 6
    free, free_target, free_drafter = costs_of(0.0)
    assert best_draft_length(free, free_target, free_drafter, 6, 0.99, Others(7, 7)) == 6
    two = best_draft_length(steep, target, drafter, 6, 0.8, Others(1, 1))
    eight = best_draft_length(steep, target, drafter, 6, 0.8, Others(7, 7))
    assert eight < two < 6, (two, eight)
    assert best_draft_length(steep, target, None, 6, 0.8, Others(7, 7)) >= eight


class Read(threading.Thread):
    """A document read for later questions, in the background of the scheduler (app/documents.py):
    its first chunk, then - once `resume` is set - the rest."""

    def __init__(self, scheduler: Scheduler, model, tokens: list[int], resume: threading.Event | None = None) -> None:
        super().__init__(daemon=True)
        self.scheduler, self.model, self.tokens, self.resume = scheduler, model, tokens, resume
        self.first_pass = threading.Event()
        self.logits: torch.Tensor | None = None

    def run(self) -> None:
        with self.scheduler.session("read") as ticket:
            assert ticket is not None

            def run(model, rows: Rows) -> torch.Tensor:
                logits = ticket.run(model, rows)
                if not self.first_pass.is_set():
                    self.first_pass.set()
                    if self.resume is not None:
                        self.resume.wait(30)
                return logits

            with ticket.in_background():
                self.logits = self.model.prefill(torch.tensor(self.tokens), self.model.new_cache(len(self.tokens) + 1),
                                                 run=run)


def passes_by_session(scheduler: Scheduler) -> list[set[str]]:
    """The sessions each pass of the scheduler serves, in order, filled in as they run."""
    log: list[set[str]] = []
    run = scheduler._run

    def logged(batch) -> None:
        log.append({request.ticket.name for request in batch})
        run(batch)

    scheduler._run = logged  # type: ignore[method-assign]
    return log


def test_a_question_goes_before_a_background_read(small_vocab_pair) -> None:
    """A question asked during a read of several chunks: no pass serves both, none of the read's
    passes runs between the question's first pass and its last, and both get what they get alone."""
    target, drafter = small_vocab_pair
    # A patience far longer than the question's gaps between passes, even on a loaded machine.
    scheduler = Scheduler(max_sessions=2, background_patience_s=10.0)
    log = passes_by_session(scheduler)
    document = random_prompt(4 * PREFILL_CHUNK - 100, seed=11, vocab=EXACT_VOCAB).prefix
    prompt, rag = prompts(300, seed=12)
    question_started = threading.Event()
    read = Read(scheduler, target.model, document, resume=question_started)
    question = Session(scheduler, "lc", target, drafter, prompt, rag, start_after=read.first_pass)
    read.start()
    question.start()
    question.first_pass.wait(60)
    question_started.set()  # the rest of the read arrives while the question decodes
    for thread in (read, question):
        thread.join(120)
        assert not thread.is_alive()
    assert not [names for names in log if len(names) > 1], log
    order = ["question" if names == {"lc"} else "read" for names in log]
    first, last = order.index("question"), len(order) - 1 - order[::-1].index("question")
    assert "read" not in order[first:last], order
    assert order.count("read") == 4 and order[-1] == "read", order
    assert question.result is not None
    assert question.result.token_ids == solo("lc", target, drafter, prompt, rag).token_ids
    alone = target.model.prefill(torch.tensor(document), target.model.new_cache(len(document) + 1))
    assert read.logits is not None and torch.equal(read.logits, alone)


def test_a_background_read_is_never_starved(small_vocab_pair) -> None:
    """Beside a question session that sends no pass, a read runs after the background patience; beside
    one whose passes keep coming, after the longest wait: it finishes while the other still asks."""
    target, _ = small_vocab_pair
    document = random_prompt(3 * PREFILL_CHUNK, seed=13, vocab=EXACT_VOCAB).prefix
    scheduler = Scheduler(max_sessions=2, background_patience_s=0.1)
    with scheduler.session("idle") as idle:
        assert idle is not None
        started = time.perf_counter()
        read = Read(scheduler, target.model, document)
        read.start()
        read.join(30)
        assert read.logits is not None
        assert time.perf_counter() - started >= 3 * 0.1  # each chunk waited for the idle session first

    scheduler = Scheduler(max_sessions=2, background_longest_wait_s=0.2)
    read = Read(scheduler, target.model, document)
    question = torch.tensor(random_prompt(200, seed=14, vocab=EXACT_VOCAB).prefix)
    asked = 0
    with scheduler.session("asking") as asking:
        assert asking is not None
        target.model.prefill(question, target.model.new_cache(201), run=asking.run)
        read.start()
        deadline = time.monotonic() + 60
        while read.logits is None and time.monotonic() < deadline:  # a new question as soon as one ends
            target.model.prefill(question, target.model.new_cache(201), run=asking.run)
            asked += 1
        read_while_asking = read.logits is not None
    read.join(10)
    assert read_while_asking and asked > 3, asked
