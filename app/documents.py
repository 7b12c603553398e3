"""The documents side of the engine: indexes, ingest, the target's windows and their KV, chunk KV.

What questions over an index read is computed once and stored: the drafter's per-chunk KV and the
target's KV of every window of documents (decoding/prefix_cache.py). A window read by one request is
read by no other at the same time: later requests for it wait for that read and show its progress.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from app.chunk_kv import ChunkKV, Passage, prune
from app.config import Settings
from app.events import Preparing
from app.forget import document_cuts, upload_copies
from app.models import Models
from app.progress import Job, PreparingBars
from app.worker import Emit, watch
from decoding.loaded_model import Prompt
from decoding.pass_costs import depth_cost_ratio
from decoding.prefill import prefill_parts
from decoding.prefix_cache import PrefixCache
from decoding.scheduler import Ticket
from decoding.settings import MAX_GAMMA
from retrieval.context import passage
from retrieval.index import HybridIndex
from retrieval.types import Chunk, IngestResult
from retrieval.windows import Window, plan_windows

PROMPT_OVERHEAD_TOKENS = 256  # chat template + question, reserved when sizing the long context
WAIT_POLL_S = 0.5  # how often a request waiting for another's read reports its progress


class Documents(Models):
    def __init__(self, settings: Settings, log: Callable[[str], None] = print) -> None:
        super().__init__(settings, log)
        self._indexes: dict[Path, HybridIndex] = {}
        self._chunk_kv: dict[tuple[Path, str], ChunkKV] = {}
        self._windows: dict[Path, tuple[tuple[object, ...], list[Window]]] = {}  # the last plan per index
        self._jobs: dict[str, Job] = {}  # what is being read now, by prefix-cache key (or store)
        self._jobs_lock = threading.Lock()
        self._preparing: set[Path] = set()  # indexes whose preparation runs in the background (uploads)
        self.prefix_cache = PrefixCache(settings.kv_cache_dir, self._model_ids)

    def open_index(self, directory: Path | None = None) -> HybridIndex:
        path = (directory or self.settings.default_index_dir).resolve()
        tokenize = self.target.encode
        with self._load_lock:
            if path not in self._indexes:
                self._indexes[path] = HybridIndex(path, self.settings.retrieval, tokenize, self.embedder)
            return self._indexes[path]

    # -------------------------------------------------------------------- ingest

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
        """After an upload (UI): build what questions will read without holding up the page. Its
        passes share the scheduler with the questions asked meanwhile."""

        def prepare() -> None:
            try:
                self.prepare(index)
                self.keep_windows_in_memory(index)
            except Exception as error:  # a failed build only means questions compute it themselves
                self.log(f"preparing the documents failed: {type(error).__name__}: {error}")
            finally:
                with self._jobs_lock:
                    self._preparing.discard(index.directory)

        with self._jobs_lock:  # before the thread starts: a question asked at once sees it
            self._preparing.add(index.directory)

        thread = threading.Thread(target=prepare, name="rapidqa-prepare", daemon=True)
        thread.start()
        return thread

    def delete(self, index: HybridIndex, doc_id_or_source: str) -> bool:
        """Remove a document and every copy of it on disk: its index rows, chunk KV, uploaded copy
        and the cached document prefixes (any model's) that hold it. A question reading one of those
        prefixes now keeps its own reference to it until it ends."""
        docs = [d for d in index.documents() if doc_id_or_source in (d.doc_id, d.source)]
        if not docs:
            return False
        windows, prompts = self.windows(index), self.document_prompts(index)
        held = [cut for doc in docs for cut in document_cuts(windows, prompts, doc.doc_id)]
        removed = index.delete(doc_id_or_source)
        prune(index.directory, lambda: self._chunk_ids(index))
        for prefix, end in held:
            self.prefix_cache.forget(prefix, end)
        for doc in docs:
            for copy in upload_copies(self.settings.uploads_dir, doc):
                copy.unlink(missing_ok=True)
        return removed

    # -------------------------------------------------------------------- chunk KV

    def chunk_kv(self, index: HybridIndex, spec: str | None = None) -> ChunkKV:
        """Per-chunk KV of the model `spec` (default: the drafter) for this index."""
        spec = spec or self.settings.models.drafter
        drafter, target = self.model(spec), self.target  # loaded before _load_lock: see Models.model
        key = (index.directory, spec)
        with self._load_lock:
            if key not in self._chunk_kv:
                model_key = self.prefix_cache.model_key(drafter.model)
                header = target.prompt([], "?").header  # the RAG prompt's (answering's prompts)
                # The KV form too: stores of q8 and bf16 processes on one index are not each other's stale ones.
                owner = f"{spec}|{drafter.weights}|{drafter.model.dtype}|kv {drafter.model.kv_dtype}"
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
        spent = [0.0]

        def build(ticket: Ticket, emit: Emit) -> None:
            with ticket.in_background():  # for later questions: those asked meanwhile go first
                spent[0] = self.encode_passages(store, todo, ticket, emit)

        self._run_watched("drafter-kv", build, progress)
        return spent[0]

    def encode_passages(self, store: ChunkKV, todo: Sequence[Passage], ticket: Ticket, emit: Emit) -> float:
        """Encode passages into the store with progress; returns the seconds spent."""
        key = f"chunks:{store.store.directory}"
        # rag and rapid-self read the target's own chunk KV; when the target drafts for itself it is both.
        models = self.settings.models
        reader = "Drafter" if store.model is not self.target.model or models.drafter == models.target else "Target"
        # Each passage is read after the same header: its cost does not grow with the job's progress.
        job = self._start_job(key, f"{reader} reading passages", sum(len(p.tokens) for p in todo), depth=None)
        try:
            return store.build(todo, lambda done, total: emit(job.update(done, total)), ticket.run)
        finally:
            self._end_job(key, job)

    # -------------------------------------------------------------------- windows

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

    # -------------------------------------------------------------------- the target's KV of a window

    def prefill_documents(self, index: HybridIndex, progress: bool = True) -> float:
        """The target's KV of every window, cached (after an ingest, before any question); returns
        the seconds spent."""
        prompts = self.document_prompts(index)
        todo = [(i, p) for i, p in enumerate(prompts, 1) if not self.prefix_cache.contains(self.target.model, p.prefix)]
        started = time.perf_counter()
        for number, prompt in todo:
            what = "Reading documents" if len(prompts) == 1 else f"Reading documents, part {number} of {len(prompts)}"
            self._run_watched("documents", lambda ticket, emit, p=prompt, w=what: self.read_window(p, ticket, emit, w),
                              progress)
        return time.perf_counter() - started if todo else 0.0

    def read_window(self, prompt: Prompt, ticket: Ticket, emit: Emit, what: str = "Reading documents") -> None:
        """Make sure the target's KV of the prompt's document prefix is stored: restore the longest
        cached run of its first documents and prefill the rest, reporting progress. When another
        request is reading the same prefix, wait for it (idle at the scheduler) and show its progress."""
        model, prefix = self.target.model, prompt.prefix
        key = self.prefix_cache.key(model, prefix)
        while not self.prefix_cache.contains(model, prefix):
            with self._jobs_lock:
                job = self._jobs.get(key)
                mine = job is None
                if mine:
                    job = self._jobs[key] = Job(what, len(prefix))
            assert job is not None
            if not mine:  # its reader may have been stopped: then the loop reads it here
                with ticket.idle():
                    while not job.finished.wait(WAIT_POLL_S):
                        emit(job.event())
                continue
            try:
                self._read(prompt, job, ticket, emit)
            finally:
                self._end_job(key, job)

    def being_read(self, index: HybridIndex, prompt: Prompt) -> bool:
        """Whether the first read of this prompt's window runs now, by a request other than the
        caller: the index's background preparation (after an upload) or another question's read."""
        key = self.prefix_cache.key(self.target.model, prompt.prefix)
        with self._jobs_lock:
            return key in self._jobs or index.directory in self._preparing

    def documents_ready(self, index: HybridIndex) -> bool:
        """Nothing is reading this index's documents now (no preparation, no first read running)."""
        with self._jobs_lock:
            return index.directory not in self._preparing and not self._jobs

    def _read(self, prompt: Prompt, job: Job, ticket: Ticket, emit: Emit) -> None:
        model, prefix, cuts = self.target.model, prompt.prefix, prompt.cuts()
        cache = self.prefix_cache.longest(model, prefix, cuts, len(prefix) + 1) or model.new_cache(len(prefix) + 1)
        job.depth = cache.length  # a restored run of documents: the prefill starts that deep
        job.prior_ratio = depth_cost_ratio(model.args)
        emit(job.update(0, len(prefix) - cache.length))
        # In the background: questions asked meanwhile answer from their passages (app/answering.py)
        # and their passes go first, so none of them waits on this read's chunks.
        with ticket.in_background():
            prefill_parts(model, prefix, cuts, cache, lambda done, total: emit(job.update(done, total)), ticket.run)
        self.prefix_cache.save(model, prefix, cache, cuts)

    def preparing(self) -> Preparing | None:
        """Progress of a read running now (e.g. the documents' prefill after an upload)."""
        with self._jobs_lock:
            jobs = list(self._jobs.values())
        return jobs[0].event() if jobs else None

    # -------------------------------------------------------------------- helpers

    def _start_job(self, key: str, what: str, total: int, depth: int | None = 0) -> Job:
        job = Job(what, total, depth=depth)
        with self._jobs_lock:
            self._jobs[key] = job
        return job

    def _end_job(self, key: str, job: Job) -> None:
        with self._jobs_lock:
            if self._jobs.get(key) is job:
                del self._jobs[key]
        job.finished.set()

    def _run_watched(self, name: str, work: Callable[[Ticket, Emit], None], bars: bool) -> None:
        """Run work through the scheduler and wait for it, showing its progress as bars (the CLI)."""
        shown = PreparingBars() if bars else None

        def show(event: object) -> None:
            if shown is not None and isinstance(event, Preparing):
                shown.show(event)

        try:
            watch(self.scheduler, name, work, show)
        finally:
            if shown is not None:
                shown.close()

    @staticmethod
    def _chunks(index: HybridIndex) -> list[Chunk]:
        return [chunk for doc in index.documents() for chunk in index.chunks(doc.doc_id)]

    def _chunk_ids(self, index: HybridIndex) -> set[str]:
        return {chunk.chunk_id for chunk in self._chunks(index)}
