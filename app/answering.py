"""Answering: a question's prompts, then its decoding as one session of the scheduler.

Retrieval runs in the caller's thread; the model work (the documents' first read if they were never
read, passages without chunk KV, the generation, a comparison with LC) runs in a session of its own
(app/worker.py), its passes batched with every other question's. Its events stream back as they come.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace

import torch

from app.answer_style import styled_question
from app.config import RAG_READ_CHUNK_KV, Settings
from app.conversation import (
    REWRITE_SYSTEM,
    REWRITE_TOKENS,
    FollowUp,
    Turn,
    fit_history,
    pairs,
    rewrite_examples,
    rewrite_request,
    standalone_from,
)
from app.documents import PROMPT_OVERHEAD_TOKENS, Documents
from app.errors import QuestionError
from app.events import Done, Event, Progress, Sources, Status, StillReading, Token
from app.passage_tokens import passage_token_spans
from app.speedup import LcReference, measured_speedup
from app.worker import Emit, run_in_session, watch
from decoding.generate import Finished, PassStats, TextDelta, generate
from decoding.loaded_model import LoadedModel, Prompt
from decoding.methods import BASELINE, Drafting, method_info
from decoding.prefill import PrefixCacheHooks
from decoding.scheduler import Ticket
from decoding.settings import DecodingSettings
from decoding.stats import Stats
from retrieval.context import build_contexts
from retrieval.errors import ContextTooLongError
from retrieval.index import HybridIndex
from retrieval.types import Contexts, RetrievalSettings

# What answers a question whose documents are still being read: the target on the retrieved passages.
PASSAGES_METHOD = "rag"


@dataclass(frozen=True)
class Question:
    """A question with everything retrieval decided for it: what the session decodes."""

    received: float  # perf_counter at its arrival
    index: HybridIndex
    decoding: DecodingSettings
    contexts: Contexts
    long_prompt: Prompt
    rag_prompt: Prompt
    follow_up: FollowUp | None
    compare: bool


class Answering(Documents):
    def __init__(self, settings: Settings, log: Callable[[str], None] = print) -> None:
        super().__init__(settings, log)
        self.lc_reference = LcReference(self.settings.home / "lc_reference.json")

    def check_question(self, question: str, decoding: DecodingSettings) -> None:
        if not question.strip():
            raise QuestionError("The question is empty.")
        if len(question) > self.settings.limits.max_question_chars:
            raise QuestionError(
                f"The question has {len(question)} characters; the limit is "
                f"{self.settings.limits.max_question_chars}."
            )
        if decoding.max_new_tokens > self.settings.limits.max_new_tokens:
            raise QuestionError(
                f"max new tokens {decoding.max_new_tokens} is over the limit of {self.settings.limits.max_new_tokens}."
            )
        try:
            decoding.validate()
        except ValueError as error:
            raise QuestionError(str(error)) from error

    # ------------------------------------------------------------------------- prompts

    def prompts(
        self, question: str, index: HybridIndex, decoding: DecodingSettings, retrieval: RetrievalSettings | None = None
    ) -> tuple[Contexts, Prompt, Prompt]:
        """retrieval overrides the per-question knobs (budget, floor); chunking is fixed by the index."""
        contexts, long_prompt, rag_prompt, _ = self.conversation_prompts(question, index, decoding, retrieval)
        return contexts, long_prompt, rag_prompt

    def conversation_prompts(
        self, question: str, index: HybridIndex, decoding: DecodingSettings, retrieval: RetrievalSettings | None = None,
        history: Sequence[Turn] = (), query: str | None = None, style: str | None = None,
    ) -> tuple[Contexts, Prompt, Prompt, tuple[Turn, ...]]:
        """The prompts of a question that may continue a conversation: retrieval searches for `query`
        (the standalone rewrite) when given; the prompts ask it in `style` (app.answer_style; default the
        settings'); both prompts hold the latest exchanges of `history` that
        fit (limits.max_history_tokens, and every reader's window), which are returned.

        Every prompt is checked against the window of each model that reads it (ContextTooLongError),
        and the RAG budget is capped at its readers' smallest window less the answer's room."""
        target = self.target
        room = decoding.max_new_tokens + decoding.gamma + 2
        long_readers, rag_readers = self.readers(decoding.method)
        rag_window = min(model.max_positions for model in rag_readers or [target])
        contexts = build_contexts(
            index, query or question, retrieval or self.settings.retrieval, target.encode,
            max_long_tokens=target.max_positions - room - PROMPT_OVERHEAD_TOKENS, windows=self.windows(index),
            max_rag_tokens=rag_window - room - PROMPT_OVERHEAD_TOKENS,
        )
        asked = styled_question(question, style or self.settings.answer_style)
        long_prompt = target.prompt(contexts.long_documents or contexts.long_context, asked)
        rag_prompt = target.prompt(contexts.rag_passages or contexts.rag_context, asked)
        # The history changes only what follows the documents: the prefixes (and their cached KV) stay.
        alone = len(long_prompt.suffix)
        free = min([m.max_positions - len(long_prompt) for m in long_readers]
                   + [m.max_positions - len(rag_prompt) for m in rag_readers])
        budget = min(self.settings.limits.max_history_tokens, free - room)
        kept = fit_history(history, lambda turns: len(target.prompt([], asked, pairs(turns)).suffix) - alone,
                           budget)
        if kept:
            suffix = target.prompt([], asked, pairs(kept)).suffix
            long_prompt, rag_prompt = replace(long_prompt, suffix=suffix), replace(rag_prompt, suffix=suffix)
        for model in long_readers:
            check_window(model, "The documents and question", len(long_prompt), room)
        for model in rag_readers:
            check_window(model, "The retrieved passages and question", len(rag_prompt), room)
        return contexts, long_prompt, rag_prompt, kept

    def readers(self, method: str) -> tuple[list[LoadedModel], list[LoadedModel]]:
        """The models that read the long prompt and those that read the RAG prompt for a method.
        The target always counts as a long reader: "Compare with LC" runs it on the documents."""
        info = method_info(method)
        drafter = self.model(self.drafter_spec(method)) if info.drafts_with_model else None
        long_readers, rag_readers = [self.target], []
        if info.target_reads_rag:
            rag_readers.append(self.target)
        if drafter is not None:
            (rag_readers if info.drafting is Drafting.RAG_MODEL else long_readers).append(drafter)
        return long_readers, rag_readers

    def standalone_question(self, question: str, history: Sequence[Turn]) -> str:
        """The follow-up rewritten by the drafter (greedy) so retrieval can read it without the history."""
        rewriter = self.draft_model
        tokens = rewriter.instruction(REWRITE_SYSTEM, rewrite_request(history, question), rewrite_examples())
        settings = replace(self.settings.decoding, method=BASELINE, max_new_tokens=REWRITE_TOKENS, temperature=0.0)
        text: list[str] = []

        def rewrite(ticket: Ticket, emit: Emit) -> None:
            with torch.inference_mode():
                events = generate(BASELINE, rewriter, None, Prompt([], tokens), None, settings, run=ticket.run)
                text.append(next(e.text for e in events if isinstance(e, Finished)))

        watch(self.scheduler, "rewrite", rewrite)
        return standalone_from(text[0])

    # ------------------------------------------------------------------------- answering

    def answer(
        self,
        question: str,
        index: HybridIndex,
        decoding: DecodingSettings | None = None,
        compare: bool = False,
        retrieval: RetrievalSettings | None = None,
        history: Sequence[Turn] = (),
        style: str | None = None,
    ) -> Iterator[Event]:
        """Stream one answer: Status, Sources, Token/Progress ..., Done.

        compare=True also runs LC on the same input afterwards and reports the measured speedup.
        history: the conversation's earlier exchanges, oldest first (the question is a follow-up).
        style: how the answer is asked to be shaped (app.answer_style); None: the settings'.
        Raises QuestionError, retrieval errors (EmptyIndexError, ContextTooLongError) before any token.
        Closing the generator stops the answer's work at its next pass.
        """
        received = time.perf_counter()
        decoding = decoding or self.settings.decoding
        self.check_question(question, decoding)
        query = None
        if history:
            yield Status("Rewriting the follow-up as a standalone question")
            query = self.standalone_question(question, history) or question
        yield Status("Retrieving passages")
        contexts, long_prompt, rag_prompt, kept = self.conversation_prompts(
            question, index, decoding, retrieval, history, query, style)
        follow_up = FollowUp(query, len(kept), len(history) - len(kept)) if query is not None else None
        yield Sources(contexts.citations, contexts.reading, follow_up)
        asked = Question(received, index, decoding, contexts, long_prompt, rag_prompt, follow_up, compare)
        yield from run_in_session(self.scheduler, "answer", lambda ticket, emit: self._decode(asked, ticket, emit))

    def _decode(self, asked: Question, ticket: Ticket, emit: Emit) -> None:
        """The question's session: what it waits for (with progress), its generation, its Done."""
        decoding, long_prompt, rag_prompt = asked.decoding, asked.long_prompt, asked.rag_prompt
        waited = time.perf_counter()  # the computations this question waits for before generating
        still_reading = False
        if method_info(decoding.method).uses_prefix_cache and not self.prefix_cache.contains(
            self.target.model, long_prompt.prefix
        ):
            if self.being_read(asked.index, long_prompt):
                # Another job reads this window now (an upload's preparation, another question): answer
                # at once from the passages instead of waiting; that read goes on untouched.
                still_reading = True
                decoding = replace(decoding, method=PASSAGES_METHOD)
                emit(StillReading())
            else:
                emit(Status(f"Reading {len(long_prompt.prefix)} tokens of documents (once; later questions reuse it)"))
                self.read_window(long_prompt, ticket, emit)
        target_name = self.settings.models.target
        emit(Status(self._prefill_message(decoding.method, long_prompt, rag_prompt)))
        rag_prefix = self._passage_kv(asked, decoding.method, ticket, emit, encode_missing=not still_reading)
        spans_needed = method_info(decoding.method).drafting is Drafting.FOCUS
        spans = self.passage_token_spans(long_prompt, asked.contexts) if spans_needed else None
        wait_s = time.perf_counter() - waited
        stats: Stats | None = None
        answer, token_ids = "", []
        for event in self._run(decoding, long_prompt, rag_prompt, ticket, rag_prefix, spans):
            if isinstance(event, TextDelta):
                emit(Token(event.text))
            elif isinstance(event, PassStats):
                if event.stats.target_passes == 1:
                    event.stats.question_to_first_s = time.perf_counter() - asked.received
                    event.stats.wait_s = wait_s
                emit(Progress(event.stats, self.lc_reference.speedup(target_name, event.stats)))
            elif isinstance(event, Finished):
                stats, answer, token_ids = event.stats, event.text, event.token_ids
        assert stats is not None
        stats.answer_s = time.perf_counter() - asked.received
        self.lc_reference.record(target_name, stats)
        lc_stats = None
        speedup = self.lc_reference.speedup(target_name, stats)
        if asked.compare and decoding.method != BASELINE and not still_reading:
            emit(Status("Measuring LC on the same input for the speedup"))
            lc = [e for e in self._run(replace(decoding, method=BASELINE), long_prompt, rag_prompt, ticket)
                  if isinstance(e, Finished)]
            lc_stats = lc[-1].stats
            self.lc_reference.record(target_name, lc_stats)
            speedup = measured_speedup(stats, lc_stats)
        emit(Done(answer, stats, asked.contexts.citations, speedup, lc_stats, asked.contexts.reading, token_ids,
                  long_prompt.tokens, rag_prompt.tokens, asked.follow_up, still_reading))

    def chunk_kv_reader(self, method: str) -> str | None:
        """The model whose per-chunk KV `method` reads its retrieved passages from: RAPID's drafter
        (the target itself in rapid-self), or the target in rag (settings.rag_read); None: no model
        reads passages from chunk KV."""
        info = method_info(method)
        if info.drafting is Drafting.RAG_MODEL and self.settings.drafter_chunk_kv:
            return self.drafter_spec(method)
        if info.target_reads_rag and self.settings.rag_read == RAG_READ_CHUNK_KV:
            return self.settings.models.target
        return None

    def _passage_kv(self, asked: Question, method: str, ticket: Ticket, emit: Emit,
                    encode_missing: bool = True) -> PrefixCacheHooks | None:
        """The RAG prompt's prefix from per-chunk KV, for the model that reads it (chunk_kv_reader),
        when the prompt is made of the chunks' passages. Passages without KV for that model (ingest
        builds the default drafter's only) are encoded now, with progress, and stored; without
        encode_missing they make it None instead (the passages are then prefilled together: one
        prefill of them costs fewer passes than encoding each after the header)."""
        spec = self.chunk_kv_reader(method)
        if spec is None or not asked.contexts.rag_chunk_ids:
            return None
        store = self.chunk_kv(asked.index, spec)
        todo = store.missing(store.prompt_passages(asked.rag_prompt, asked.contexts.rag_chunk_ids))
        if todo and not encode_missing:
            return None
        if todo:
            self.encode_passages(store, todo, ticket, emit)
        return store.hooks(asked.rag_prompt, asked.contexts.rag_chunk_ids, ticket.run)

    def passage_token_spans(self, long_prompt: Prompt, contexts: Contexts) -> list[tuple[int, int]]:
        """Where the retrieved passages lie in the long prompt, as token ranges (a focus drafter's)."""
        return passage_token_spans(self.target, long_prompt, contexts.long_documents, contexts.passage_spans)

    def _run(self, decoding: DecodingSettings, long_prompt: Prompt, rag_prompt: Prompt, ticket: Ticket,
             rag_prefix: PrefixCacheHooks | None = None, passage_spans: list[tuple[int, int]] | None = None,
             ) -> Iterator[object]:
        method = decoding.method
        # None where no separate drafter runs: generate then drafts with the target (rapid-self, MagicDec).
        draft_model = self.draft_model if method_info(method).runs_drafter_model else None
        with torch.inference_mode():
            hooks = self.prefix_cache.hooks(long_prompt.cuts(), run=ticket.run)
            yield from generate(method, self.target, draft_model, long_prompt, rag_prompt, decoding, hooks, rag_prefix,
                                passage_spans, run=ticket.run,
                                plan=ticket.draft_length if self.settings.plan_drafts else None)

    def _prefill_message(self, method: str, long_prompt: Prompt, rag_prompt: Prompt) -> str:
        if method_info(method).target_reads_rag:
            return f"Reading {len(rag_prompt)} retrieved tokens"
        return f"Reading {len(long_prompt)} tokens of documents (cached prefixes are reused)"


def check_window(model: LoadedModel, what: str, tokens: int, room: int) -> None:
    """A prompt that runs past a model's window, as the user-facing ContextTooLongError."""
    try:
        model.check_fits(what, tokens, room)
    except ValueError as error:
        raise ContextTooLongError(str(error)) from error
