"""question + index + settings -> a stream of events. The UI, the CLI, bench and eval all use this."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import torch

from app.chunk_kv import ChunkKV, Passage, prune
from app.config import Settings
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
from app.errors import QuestionError
from app.events import Done, Event, Preparing, Progress, Sources, Status, Token
from app.forget import document_cuts, upload_copies
from app.passage_tokens import passage_token_spans
from app.progress import Job, cli_bar, run_with_progress
from app.registry import resolve_model
from app.speedup import LcReference, measured_speedup
from decoding.engine_info import engine_description, warn_once
from decoding.generate import Finished, PassStats, TextDelta, generate
from decoding.loaded_model import LoadedModel, Prompt
from decoding.loading import load_model, pick_device, pick_dtype, wants_quantized
from decoding.methods import BASELINE, Drafting, method_info
from decoding.prefill import PrefixCacheHooks, prefill_parts
from decoding.prefix_cache import PrefixCache
from decoding.settings import MAX_GAMMA, DecodingSettings
from decoding.stats import Stats
from retrieval.context import build_contexts, passage
from retrieval.embedding import Embedder
from retrieval.errors import ContextTooLongError
from retrieval.index import HybridIndex
from retrieval.types import Chunk, Contexts, IngestResult, RetrievalSettings
from retrieval.windows import Window, plan_windows

PROMPT_OVERHEAD_TOKENS = 256  # chat template + question, reserved when sizing the long context


class Engine:
    """Models and indexes loaded once and shared by every question (and every UI session).

    One answer is computed at a time: on a CPU two would only halve each other's speed, and the
    shared prefix cache assumes it. Gradio's queue keeps the other requests waiting in order.
    """

    def __init__(self, settings: Settings, log: Callable[[str], None] = print) -> None:
        self.settings = settings
        self.log = log
        self.device = pick_device(settings.models.device)
        self._models: dict[str, LoadedModel] = {}
        self._model_ids: dict[int, str] = {}
        self._indexes: dict[Path, HybridIndex] = {}
        self._chunk_kv: dict[tuple[Path, str], ChunkKV] = {}
        self._windows: dict[Path, tuple[tuple[object, ...], list[Window]]] = {}  # the last plan per index
        self._embedder: Embedder | None = None
        self._load_lock = threading.RLock()  # re-entrant: open_index loads the embedder under it
        self._generate_lock = threading.Lock()
        self._background_lock = threading.Lock()
        self._job: Job | None = None  # the computation holding the generate lock, when it reports progress
        self.prefix_cache = PrefixCache(settings.kv_cache_dir, self._model_ids)
        self.lc_reference = LcReference(settings.home / "lc_reference.json")

    # ------------------------------------------------------------------ models and indexes

    def model(self, spec: str) -> LoadedModel:
        with self._load_lock:
            if spec not in self._models:
                directory = resolve_model(spec, self.settings.models_dir, self.log)
                dtype = pick_dtype(self.settings.models.dtype, self.device)
                quantized = wants_quantized(self.settings.models.dtype, self.device)
                loaded = load_model(spec, directory, dtype, self.device, quantized=quantized)
                warn_once(engine_description(loaded))  # a slow fallback is said once, on stderr
                self._models[spec] = loaded
                # Quantized and dense weights give different KV: cached prefixes must not mix.
                weights = "" if loaded.weights == "dense" else f":{loaded.weights}"
                self._model_ids[id(loaded.model)] = f"{directory.resolve()}:{_weights_stamp(directory)}{weights}"
            return self._models[spec]

    @property
    def target(self) -> LoadedModel:
        return self.model(self.settings.models.target)

    @property
    def draft_model(self) -> LoadedModel:
        return self.model(self.settings.models.drafter)

    @property
    def embedder(self) -> Embedder:
        with self._load_lock:
            if self._embedder is None:
                self._embedder = Embedder()
            return self._embedder

    def open_index(self, directory: Path | None = None) -> HybridIndex:
        path = (directory or self.settings.default_index_dir).resolve()
        tokenize = self.target.encode
        with self._load_lock:
            if path not in self._indexes:
                self._indexes[path] = HybridIndex(path, self.settings.retrieval, tokenize, self.embedder)
            return self._indexes[path]

    # -------------------------------------------------------------------- documents

    def ingest(self, index: HybridIndex, paths: Sequence[Path], progress: bool = True) -> list[IngestResult]:
        """Add files and folders, then prepare what questions will read (see prepare)."""
        results = index.add_files(paths, progress=progress)
        self.prepare(index, progress)
        return results

    def prepare(self, index: HybridIndex, progress: bool = False) -> None:
        """Compute what questions over this index read: the drafter's chunk KV, then the target's
        KV of the documents (extending a cached prefix of them where one exists)."""
        prune(index.directory, lambda: self._chunk_ids(index))  # replaced versions' and deleted chunks
        if self.settings.drafter_chunk_kv:
            self.build_drafter_kv(index, progress)
        self.prefill_documents(index, progress)

    def prepare_in_background(self, index: HybridIndex) -> threading.Thread:
        """After an upload (UI): build what questions will read without holding up the page."""

        def prepare() -> None:
            with self._background_lock:  # jobs run one after another; each does only what is missing
                try:
                    self.prepare(index)
                    self.keep_windows_in_memory(index)
                except Exception as error:  # a failed build only means questions compute it themselves
                    self.log(f"preparing the documents failed: {type(error).__name__}: {error}")

        thread = threading.Thread(target=prepare, name="rapidqa-prepare", daemon=True)
        thread.start()
        return thread

    def delete(self, index: HybridIndex, doc_id_or_source: str) -> bool:
        """Remove a document and every copy of it on disk: its index rows, chunk KV, uploaded copy
        and the cached document prefixes (any model's) that hold it."""
        docs = [d for d in index.documents() if doc_id_or_source in (d.doc_id, d.source)]
        if not docs:
            return False
        windows, prompts = self.windows(index), self.document_prompts(index)
        held = [cut for doc in docs for cut in document_cuts(windows, prompts, doc.doc_id)]
        removed = index.delete(doc_id_or_source)
        prune(index.directory, lambda: self._chunk_ids(index))
        with self._generate_lock:  # a question in flight may be reading these entries
            for prefix, end in held:
                self.prefix_cache.forget(prefix, end)
        for doc in docs:
            for copy in upload_copies(self.settings.uploads_dir, doc):
                copy.unlink(missing_ok=True)
        return removed

    def drafter_spec(self, method: str) -> str:
        """The model that drafts for `method` on the retrieved passages (the target drafts for itself in rapid-self)."""
        return self.settings.models.target if method_info(method).drafter_is_target else self.settings.models.drafter

    def chunk_kv(self, index: HybridIndex, spec: str | None = None) -> ChunkKV:
        """Per-chunk KV of the model `spec` (default: the drafter) for this index."""
        spec = spec or self.settings.models.drafter
        drafter = self.model(spec)
        key = (index.directory, spec)
        with self._load_lock:
            if key not in self._chunk_kv:
                model_key = self.prefix_cache.model_key(drafter.model)
                header = self.target.prompt([], "?").header  # the RAG prompt's (self.prompts)
                owner = f"{spec}|{drafter.weights}|{drafter.model.dtype}"
                max_bytes = int(self.settings.chunk_kv_gb * 1e9)
                self._chunk_kv[key] = ChunkKV(index.directory, drafter.model, model_key, header, owner, max_bytes)
            return self._chunk_kv[key]

    def passages(self, chunks: Sequence[Chunk]) -> list[Passage]:
        """Chunks as the drafter's prompt holds them (the tokens decoding.loaded_model.Prompt gives them)."""
        target = self.target
        return [Passage(chunk.chunk_id, target.piece_tokens(passage(chunk))) for chunk in chunks]

    def build_drafter_kv(self, index: HybridIndex, progress: bool = True, spec: str | None = None) -> float:
        """Encode every chunk the drafter (or the model `spec`) has no KV for yet; returns the seconds spent."""
        store = self.chunk_kv(index, spec)
        passages = self.passages(self._chunks(index))
        store.keep_only(passages)
        todo = store.missing(passages)
        if not todo:
            return 0.0
        with self._generate_lock, torch.inference_mode(), self._track("Drafter reading passages", progress) as job:
            return store.build(todo, job.update)

    def window_capacity(self) -> int:
        """Tokens of documents one window holds: the target's window less its prompt header, the
        question and the longest answer a question may ask for (so any question fits any window)."""
        target = self.target
        answer_room = self.settings.limits.max_new_tokens + MAX_GAMMA + 2
        header = len(target.prompt([], "?").prefix)
        return target.max_positions - PROMPT_OVERHEAD_TOKENS - answer_room - header

    def windows(self, index: HybridIndex) -> list[Window]:
        """The corpus as the target reads it: one window when it fits, else several (retrieval.windows)."""
        target = self.target
        capacity = self.window_capacity()
        key = (capacity, *((doc.doc_id, doc.source) for doc in index.documents(in_ingest_order=True)))
        with self._load_lock:
            known = self._windows.get(index.directory)
        if known is not None and known[0] == key:
            return known[1]
        planned = plan_windows(index, lambda piece: len(target.piece_tokens(piece)), capacity)
        with self._load_lock:
            self._windows[index.directory] = (key, planned)
        return planned

    def reading_parts(self, index: HybridIndex) -> list[str]:
        """What each window holds, for people; [] when the corpus fits the target's window whole."""
        labels = [window.label() for window in self.windows(index)]
        return labels if len(labels) > 1 else []

    def keep_windows_in_memory(self, index: HybridIndex) -> int:
        """Load every window's cached KV into RAM when they fit `hot_windows_gb` (a long-running
        process: the server, eval), so that switching windows costs no disk read; returns how many
        windows are held. One window is always held by the prefix cache's own recency rule."""
        prompts = self.document_prompts(index)
        model = self.target.model
        needed = sum(len(p.prefix) for p in prompts) * self.prefix_cache.bytes_per_1k_tokens(model) / 1000
        if len(prompts) < 2 or needed > self.settings.hot_windows_gb * 1e9:
            return min(len(prompts), 1)
        # One more than the windows: an SD drafter's prefix shares the same recency list.
        self.prefix_cache.in_memory = max(self.prefix_cache.in_memory, len(prompts) + 1)
        for prompt in prompts:
            with self._generate_lock:  # one window at a time: a question may run in between
                self.prefix_cache.hold(model, prompt.prefix)
        return len(prompts)

    def document_prompts(self, index: HybridIndex) -> list[Prompt]:
        """Each window's document prefix (any question: it ends where the question starts)."""
        target = self.target
        return [target.prompt(window.pieces, "?") for window in self.windows(index)]

    def document_prompt(self, index: HybridIndex) -> Prompt | None:
        """The first window's document prefix (the whole corpus when it fits); None without documents."""
        prompts = self.document_prompts(index)
        return prompts[0] if prompts else None

    def prefill_documents(self, index: HybridIndex, progress: bool = True) -> float:
        """The target's KV of every window, cached (after an ingest, before any question)."""
        prompts = self.document_prompts(index)
        todo = [(i, p) for i, p in enumerate(prompts, 1) if not self.prefix_cache.contains(self.target.model, p.prefix)]
        spent = 0.0
        for number, prompt in todo:
            what = "Reading documents" if len(prompts) == 1 else f"Reading documents, part {number} of {len(prompts)}"
            with self._generate_lock:
                spent += self._prefill_prefix(prompt, progress, what)
        return spent

    def _prefill_prefix(self, prompt: Prompt, progress: bool, what: str = "Reading documents") -> float:
        """Restore the longest cached run of the prompt's first documents, prefill the rest, store
        it; the caller holds the generate lock. Returns the seconds spent."""
        model, prefix, cuts = self.target.model, prompt.prefix, prompt.cuts()
        if self.prefix_cache.contains(model, prefix):
            return 0.0
        started = time.perf_counter()
        with torch.inference_mode(), self._track(what, progress) as job:
            cache = self.prefix_cache.longest(model, prefix, cuts, len(prefix) + 1)
            cache = cache or model.new_cache(len(prefix) + 1)
            job.update(0, len(prefix) - cache.length)
            prefill_parts(model, prefix, cuts, cache, job.update)
            self.prefix_cache.save(model, prefix, cache, cuts)
        return time.perf_counter() - started

    def preparing(self) -> Preparing | None:
        """Progress of the computation running now (e.g. the documents' prefill after an upload)."""
        job = self._job
        return job.event() if job is not None else None

    @contextmanager
    def _track(self, what: str, bar: bool) -> Iterator[Job]:
        """Progress of a computation that holds the generate lock: questions waiting show it."""
        job = Job(what, 0, bar=cli_bar(what, 0) if bar else None)
        self._job = job
        try:
            yield job
        finally:
            job.close()
            if self._job is job:
                self._job = None

    def _wait_for_engine(self) -> Iterator[Event]:
        """Take the generate lock, meanwhile reporting what holds it when that reports progress."""
        announced = False
        while not self._generate_lock.acquire(timeout=0.5):
            job = self._job
            if job is not None:
                yield job.event()
            elif not announced:
                yield Status("Waiting for the previous question to finish")
                announced = True

    @staticmethod
    def _chunks(index: HybridIndex) -> list[Chunk]:
        return [chunk for doc in index.documents() for chunk in index.chunks(doc.doc_id)]

    def _chunk_ids(self, index: HybridIndex) -> set[str]:
        return {chunk.chunk_id for chunk in self._chunks(index)}

    # ------------------------------------------------------------------------- answering

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

    def prompts(
        self, question: str, index: HybridIndex, decoding: DecodingSettings, retrieval: RetrievalSettings | None = None
    ) -> tuple[Contexts, Prompt, Prompt]:
        """retrieval overrides the per-question knobs (budget, floor); chunking is fixed by the index."""
        contexts, long_prompt, rag_prompt, _ = self.conversation_prompts(question, index, decoding, retrieval)
        return contexts, long_prompt, rag_prompt

    def conversation_prompts(
        self, question: str, index: HybridIndex, decoding: DecodingSettings, retrieval: RetrievalSettings | None = None,
        history: Sequence[Turn] = (), query: str | None = None,
    ) -> tuple[Contexts, Prompt, Prompt, tuple[Turn, ...]]:
        """The prompts of a question that may continue a conversation: retrieval searches for `query`
        (the standalone rewrite) when given; both prompts hold the latest exchanges of `history` that
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
        long_prompt = target.prompt(contexts.long_documents or contexts.long_context, question)
        rag_prompt = target.prompt(contexts.rag_passages or contexts.rag_context, question)
        # The history changes only what follows the documents: the prefixes (and their cached KV) stay.
        alone = len(long_prompt.suffix)
        free = min([m.max_positions - len(long_prompt) for m in long_readers]
                   + [m.max_positions - len(rag_prompt) for m in rag_readers])
        budget = min(self.settings.limits.max_history_tokens, free - room)
        kept = fit_history(history, lambda turns: len(target.prompt([], question, pairs(turns)).suffix) - alone,
                           budget)
        if kept:
            suffix = target.prompt([], question, pairs(kept)).suffix
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
        """The follow-up rewritten by the drafter (greedy) so retrieval can read it without the history;
        the caller holds the generate lock."""
        rewriter = self.draft_model
        tokens = rewriter.instruction(REWRITE_SYSTEM, rewrite_request(history, question), rewrite_examples())
        settings = replace(self.settings.decoding, method=BASELINE, max_new_tokens=REWRITE_TOKENS, temperature=0.0)
        with torch.inference_mode():
            events = generate(BASELINE, rewriter, None, Prompt([], tokens), None, settings)
            text = next(e.text for e in events if isinstance(e, Finished))
        return standalone_from(text)

    def answer(
        self,
        question: str,
        index: HybridIndex,
        decoding: DecodingSettings | None = None,
        compare: bool = False,
        retrieval: RetrievalSettings | None = None,
        history: Sequence[Turn] = (),
    ) -> Iterator[Event]:
        """Stream one answer: Status, Sources, Token/Progress ..., Done.

        compare=True also runs LC on the same input afterwards and reports the measured speedup.
        history: the conversation's earlier exchanges, oldest first (the question is a follow-up).
        Raises QuestionError, retrieval errors (EmptyIndexError, ContextTooLongError) before any token.
        """
        received = time.perf_counter()
        decoding = decoding or self.settings.decoding
        self.check_question(question, decoding)
        query = None
        if history:
            yield Status("Rewriting the follow-up as a standalone question")
            yield from self._wait_for_engine()
            try:
                query = self.standalone_question(question, history) or question
            finally:
                self._generate_lock.release()
        yield Status("Retrieving passages")
        contexts, long_prompt, rag_prompt, kept = self.conversation_prompts(
            question, index, decoding, retrieval, history, query)
        follow_up = FollowUp(query, len(kept), len(history) - len(kept)) if query is not None else None
        yield Sources(contexts.citations, contexts.reading, follow_up)
        yield from self._wait_for_engine()
        try:
            waited = time.perf_counter()  # the computations this question waits for before generating
            if method_info(decoding.method).uses_prefix_cache and not self.prefix_cache.contains(
                self.target.model, long_prompt.prefix
            ):
                yield Status(f"Reading {len(long_prompt.prefix)} tokens of documents (once; later questions reuse it)")
                yield from run_with_progress(lambda: self._prefill_prefix(long_prompt, False), lambda: self._job)
            target_name = self.settings.models.target
            yield Status(self._prefill_message(decoding.method, long_prompt, rag_prompt))
            stats: Stats | None = None
            answer, token_ids = "", []
            rag_prefix = self._rag_prefix(decoding, index, contexts, rag_prompt)
            if rag_prefix is not None:
                yield from self._encode_missing_passages(decoding.method, index, contexts, rag_prompt)
            spans_needed = method_info(decoding.method).drafting is Drafting.FOCUS
            spans = self.passage_token_spans(long_prompt, contexts) if spans_needed else None
            wait_s = time.perf_counter() - waited
            for event in self._run(decoding, long_prompt, rag_prompt, rag_prefix, spans):
                if isinstance(event, TextDelta):
                    yield Token(event.text)
                elif isinstance(event, PassStats):
                    if event.stats.target_passes == 1:
                        event.stats.question_to_first_s = time.perf_counter() - received
                        event.stats.wait_s = wait_s
                    yield Progress(event.stats, self.lc_reference.speedup(target_name, event.stats))
                elif isinstance(event, Finished):
                    stats, answer, token_ids = event.stats, event.text, event.token_ids
            assert stats is not None
            stats.answer_s = time.perf_counter() - received
            self.lc_reference.record(target_name, stats)
            lc_stats = None
            speedup = self.lc_reference.speedup(target_name, stats)
            if compare and decoding.method != BASELINE:
                yield Status("Measuring LC on the same input for the speedup")
                lc_stats = self._finish(self._run(replace(decoding, method=BASELINE), long_prompt, rag_prompt))
                self.lc_reference.record(target_name, lc_stats)
                speedup = measured_speedup(stats, lc_stats)
        finally:
            self._generate_lock.release()
        yield Done(answer, stats, contexts.citations, speedup, lc_stats, contexts.reading, token_ids,
                   long_prompt.tokens, rag_prompt.tokens, follow_up)

    def _rag_prefix(
        self, decoding: DecodingSettings, index: HybridIndex, contexts: Contexts, rag_prompt: Prompt
    ) -> PrefixCacheHooks | None:
        """RAPID's drafter context from per-chunk KV, when the prompt is made of the chunks' passages."""
        rag_drafter = method_info(decoding.method).drafting is Drafting.RAG_MODEL
        if not rag_drafter or not self.settings.drafter_chunk_kv or not contexts.rag_chunk_ids:
            return None
        return self.chunk_kv(index, self.drafter_spec(decoding.method)).hooks(rag_prompt, contexts.rag_chunk_ids)

    def _encode_missing_passages(self, method: str, index: HybridIndex, contexts: Contexts,
                                 rag_prompt: Prompt) -> Iterator[Event]:
        """Passages without chunk KV for this drafter (ingest builds the default drafter's only) are
        encoded now, with progress; the caller holds the generate lock."""
        store = self.chunk_kv(index, self.drafter_spec(method))
        todo = store.missing(store.prompt_passages(rag_prompt, contexts.rag_chunk_ids))
        if not todo:
            return

        def build() -> None:
            with torch.inference_mode(), self._track("Drafter reading passages", False) as job:
                store.build(todo, job.update)

        yield from run_with_progress(build, lambda: self._job)

    def passage_token_spans(self, long_prompt: Prompt, contexts: Contexts) -> list[tuple[int, int]]:
        """Where the retrieved passages lie in the long prompt, as token ranges (a focus drafter's)."""
        return passage_token_spans(self.target, long_prompt, contexts.long_documents, contexts.passage_spans)

    def _run(self, decoding: DecodingSettings, long_prompt: Prompt, rag_prompt: Prompt,
             rag_prefix: PrefixCacheHooks | None = None, passage_spans: list[tuple[int, int]] | None = None,
             ) -> Iterator[object]:
        method = decoding.method
        # None where no separate drafter runs: generate then drafts with the target (rapid-self, MagicDec).
        draft_model = self.draft_model if method_info(method).runs_drafter_model else None
        with torch.inference_mode():
            hooks = self.prefix_cache.hooks(long_prompt.cuts())
            yield from generate(method, self.target, draft_model, long_prompt, rag_prompt, decoding, hooks, rag_prefix,
                                passage_spans)

    @staticmethod
    def _finish(events: Iterator[object]) -> Stats:
        final = [e for e in events if isinstance(e, Finished)]
        return final[-1].stats

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


def _weights_stamp(directory: Path) -> str:
    marker = directory / "rapidqa-model.json"
    if marker.exists():
        return marker.read_text()
    files = sorted(directory.glob("*.safetensors"))
    return ";".join(f"{f.name}:{f.stat().st_size}:{int(f.stat().st_mtime)}" for f in files)


def answer_once(engine: Engine, question: str, index: HybridIndex, decoding: DecodingSettings | None = None,
                compare: bool = False, history: Sequence[Turn] = ()) -> Done:
    """Run answer() to the end and return its Done event (eval, bench and tests)."""
    done = [e for e in engine.answer(question, index, decoding, compare, history=history) if isinstance(e, Done)]
    return done[-1]

