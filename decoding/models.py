"""A loaded language model: the engine's Transformer, its tokenizer, stop tokens and prompt format."""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from decoding.model import QUANT_FILE, Transformer, load_quantized, load_transformer, quantized_format
from decoding.quant import QUANT_FORMAT

SYSTEM_PROMPT = (
    "You answer questions about the documents the user provides. Answer briefly and only from "
    "the documents; if they do not contain the answer, say so."
)
QUESTION_MARK = "\n\nQuestion: "
PIECE_SEPARATOR = "\n\n"
DOCUMENTS_MARK = "\x00documents\x00"  # where the pieces go in the rendered template


@dataclass(frozen=True)
class Prompt:
    """Prompt tokens split where the question starts: the prefix depends on the documents only.

    The prefix is a header followed by pieces (documents or passages), each tokenised on its own;
    `boundaries` holds where each piece starts in the prefix, so a piece's tokens never depend on
    its neighbours and a prefix can be cached, extended or assembled piece by piece.
    """

    prefix: list[int]
    suffix: list[int]
    boundaries: tuple[int, ...] = ()

    @property
    def tokens(self) -> list[int]:
        return self.prefix + self.suffix

    @property
    def header(self) -> list[int]:
        return self.prefix[: self.boundaries[0]] if self.boundaries else self.prefix

    def cuts(self) -> list[int]:
        """Where the prefix's parts end: the header, then each piece (the whole prefix last)."""
        return [*self.boundaries, len(self.prefix)]

    def pieces(self) -> list[list[int]]:
        if not self.boundaries:
            return []
        ends = [*self.boundaries[1:], len(self.prefix)]
        return [self.prefix[start:end] for start, end in zip(self.boundaries, ends, strict=True)]

    def __len__(self) -> int:
        return len(self.prefix) + len(self.suffix)


@dataclass
class LoadedModel:
    name: str
    directory: Path | None
    model: Transformer
    tokenizer: PreTrainedTokenizerBase
    stop_ids: frozenset[int]
    weights: str = "dense"  # "quantized" (the GGUF's own values, CPU kernel) or "dense" (model.dtype)

    @property
    def max_positions(self) -> int:
        return self.model.args.max_positions

    @functools.cached_property
    def vocabulary_key(self) -> str:
        """A hash of the token -> id map, computed once: drafter and target must share it."""
        vocabulary = sorted(self.tokenizer.get_vocab().items())
        return hashlib.sha256(repr(vocabulary).encode()).hexdigest()

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def piece_tokens(self, piece: str) -> list[int]:
        """A document or passage as the prompt holds it: after a blank line, tokenised alone."""
        return self.encode(PIECE_SEPARATOR + piece)

    def prompt(self, context: str | Sequence[str], question: str,
               history: Sequence[tuple[str, str]] = ()) -> Prompt:
        """Chat-templated prompt when the model has a template, else a plain document/question text.

        context is one text or a list of pieces (documents, passages), each after a blank line.
        history: a conversation's earlier (question, answer) exchanges, oldest first. They follow the
        documents (the first question goes with them, the later ones as their own turns), so the
        prefix, and with it every cached document KV, is the same at every turn.
        """
        pieces = [context] if isinstance(context, str) else list(context)
        questions = [q for q, _ in history] + [question]
        user = f"Documents:{DOCUMENTS_MARK}{QUESTION_MARK}{questions[0]}"
        if self.tokenizer.chat_template:
            messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]
            for (_, answer), later in zip(history, questions[1:], strict=True):
                messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": later}]
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        else:
            turns = "".join(f"\nAnswer: {answer}{QUESTION_MARK}{later}"
                            for (_, answer), later in zip(history, questions[1:], strict=True))
            text = f"{SYSTEM_PROMPT}\n\n{user}{turns}\nAnswer:"
        # Header, pieces and question are tokenised apart, always: a cached or assembled prefix and
        # a from-scratch prompt are then the very same token sequence.
        head, tail = text.split(DOCUMENTS_MARK)
        prefix = self.encode(head)
        boundaries = []
        for piece in pieces:
            boundaries.append(len(prefix))
            prefix += self.piece_tokens(piece)
        return Prompt(prefix, self.encode(tail), tuple(boundaries))

    def instruction(self, system: str, user: str, examples: Sequence[tuple[str, str]] = ()) -> list[int]:
        """A chat for a small task (such as a rewrite): worked (request, reply) examples, then `user`,
        ready for the model's reply."""
        if self.tokenizer.chat_template:
            messages = [{"role": "system", "content": system}]
            for request, reply in examples:
                messages += [{"role": "user", "content": request}, {"role": "assistant", "content": reply}]
            messages.append({"role": "user", "content": user})
            return self.encode(self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                                  add_generation_prompt=True))
        shown = "".join(f"{request} {reply}\n\n" for request, reply in examples)
        return self.encode(f"{system}\n\n{shown}{user}")


def pick_device(requested: str = "auto") -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def pick_dtype(requested: str, device: torch.device) -> torch.dtype:
    if requested != "auto":
        return {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32,
                "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16}[requested]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    # bf16 ran 2-3x faster than fp32 here (memory-bound decode), where the CPU has bf16 units.
    return torch.bfloat16 if cpu_has_bf16() else torch.float32


def stop_ids_for(directory: Path, tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    ids: set[int] = set()
    generation = directory / "generation_config.json"
    if generation.exists():
        eos = json.loads(generation.read_text()).get("eos_token_id")
        ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    for special in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>"):
        token_id = tokenizer.convert_tokens_to_ids(special)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id:
            ids.add(token_id)
    return frozenset(ids)


def wants_quantized(requested_dtype: str, device: torch.device) -> bool:
    """The quantized CPU engine is the default; an explicit dtype (e.g. --dtype bf16) or a GPU
    keeps dense weights."""
    return requested_dtype == "auto" and device.type == "cpu"


def has_quantized_weights(directory: Path) -> bool:
    return (directory / QUANT_FILE).exists() and quantized_format(directory) == QUANT_FORMAT


def load_model(name: str, directory: Path, dtype: torch.dtype, device: torch.device,
               quantized: bool = False) -> LoadedModel:
    """quantized: use the directory's quantized weights when it has current ones (CPU only);
    activations, norms and the KV cache stay in `dtype`."""
    tokenizer = AutoTokenizer.from_pretrained(directory)
    if quantized and device.type == "cpu" and has_quantized_weights(directory):
        model, weights = load_quantized(directory, dtype), "quantized"
    else:
        model, weights = load_transformer(directory, dtype, str(device)), "dense"
    return LoadedModel(name, directory, model, tokenizer, stop_ids_for(directory, tokenizer), weights)
