"""question + index + settings -> a stream of events. The UI, the CLI, bench and eval all use this."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import torch

from app.config import Settings
from app.errors import QuestionError
from app.events import Done, Event, Progress, Sources, Status, Token
from app.registry import resolve_model
from app.speedup import LcReference, Speedup, measured_speedup
from decoding.generate import Finished, PassStats, TextDelta, generate
from decoding.methods import method as method_info
from decoding.models import LoadedModel, Prompt, load_model, pick_device, pick_dtype
from decoding.prefix_cache import PrefixCache
from decoding.settings import DecodingSettings
from decoding.stats import Stats
from retrieval.context import build_contexts
from retrieval.embedding import Embedder
from retrieval.errors import ContextTooLongError
from retrieval.index import HybridIndex
from retrieval.types import Contexts, RetrievalSettings

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
        self._embedder: Embedder | None = None
        self._load_lock = threading.RLock()  # re-entrant: open_index loads the embedder under it
        self._generate_lock = threading.Lock()
        self.prefix_cache = PrefixCache(settings.kv_cache_dir, self._model_ids)
        self.lc_reference = LcReference(settings.home / "lc_reference.json")

    # ------------------------------------------------------------------ models and indexes

    def model(self, spec: str) -> LoadedModel:
        with self._load_lock:
            if spec not in self._models:
                directory = resolve_model(spec, self.settings.models_dir, self.log)
                dtype = pick_dtype(self.settings.models.dtype, self.device)
                loaded = load_model(spec, directory, dtype, self.device)
                self._models[spec] = loaded
                self._model_ids[id(loaded.model)] = f"{directory.resolve()}:{_weights_stamp(directory)}"
            return self._models[spec]

    @property
    def target(self) -> LoadedModel:
        return self.model(self.settings.models.target)

    @property
    def drafter(self) -> LoadedModel:
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
        target = self.target
        room = decoding.max_new_tokens + decoding.gamma + 2
        contexts = build_contexts(
            index, question, retrieval or self.settings.retrieval, target.encode,
            max_long_tokens=target.max_positions - room - PROMPT_OVERHEAD_TOKENS,
        )
        long_prompt = target.prompt(contexts.long_context, question)
        if len(long_prompt) + room > target.max_positions:
            raise ContextTooLongError(
                f"The documents and question take {len(long_prompt)} tokens and the answer needs {room} more, "
                f"but {target.name} reads at most {target.max_positions}. Remove documents or lower max new tokens."
            )
        return contexts, long_prompt, target.prompt(contexts.rag_context, question)

    def answer(
        self,
        question: str,
        index: HybridIndex,
        decoding: DecodingSettings | None = None,
        compare: bool = False,
        retrieval: RetrievalSettings | None = None,
    ) -> Iterator[Event]:
        """Stream one answer: Status, Sources, Token/Progress ..., Done.

        compare=True also runs LC on the same input afterwards and reports the measured speedup.
        Raises QuestionError, retrieval errors (EmptyIndexError, ContextTooLongError) before any token.
        """
        decoding = decoding or self.settings.decoding
        self.check_question(question, decoding)
        yield Status("Retrieving passages")
        contexts, long_prompt, rag_prompt = self.prompts(question, index, decoding, retrieval)
        yield Sources(contexts.citations)
        with self._generate_lock:
            target_name = self.settings.models.target
            yield Status(self._prefill_message(decoding.method, long_prompt, rag_prompt))
            stats: Stats | None = None
            answer = ""
            for event in self._run(decoding, long_prompt, rag_prompt):
                if isinstance(event, TextDelta):
                    yield Token(event.text)
                elif isinstance(event, PassStats):
                    yield Progress(event.stats, self.lc_reference.speedup(target_name, event.stats))
                elif isinstance(event, Finished):
                    stats, answer = event.stats, event.text
            assert stats is not None
            self.lc_reference.record(target_name, stats)
            lc_stats = None
            speedup = self.lc_reference.speedup(target_name, stats)
            if compare and decoding.method != "lc":
                yield Status("Measuring LC on the same input for the speedup")
                lc_stats = self._finish(self._run(replace(decoding, method="lc"), long_prompt, rag_prompt))
                self.lc_reference.record(target_name, lc_stats)
                speedup = measured_speedup(stats, lc_stats)
        yield Done(answer, stats, contexts.citations, speedup, lc_stats)

    def _run(self, decoding: DecodingSettings, long_prompt: Prompt, rag_prompt: Prompt) -> Iterator[object]:
        method = decoding.method
        drafter = self.drafter if method_info(method).runs_drafter_model else None
        with torch.inference_mode():
            hooks = self.prefix_cache.hooks()
            yield from generate(method, self.target, drafter, long_prompt, rag_prompt, decoding, hooks)

    @staticmethod
    def _finish(events: Iterator[object]) -> Stats:
        final = [e for e in events if isinstance(e, Finished)]
        return final[-1].stats

    def _prefill_message(self, method: str, long_prompt: Prompt, rag_prompt: Prompt) -> str:
        if method == "rag":
            return f"Reading {len(rag_prompt)} retrieved tokens"
        return f"Reading {len(long_prompt)} tokens of documents (cached prefixes are reused)"


def _weights_stamp(directory: Path) -> str:
    marker = directory / "rapidqa-model.json"
    if marker.exists():
        return marker.read_text()
    files = sorted(directory.glob("*.safetensors"))
    return ";".join(f"{f.name}:{f.stat().st_size}:{int(f.stat().st_mtime)}" for f in files)


def answer_once(engine: Engine, question: str, index: HybridIndex, decoding: DecodingSettings | None = None,
                compare: bool = False) -> Done:
    """Run answer() to the end and return its Done event (eval and tests)."""
    done = [e for e in engine.answer(question, index, decoding, compare) if isinstance(e, Done)]
    return done[-1]


__all__ = ["Engine", "QuestionError", "Speedup", "answer_once"]
