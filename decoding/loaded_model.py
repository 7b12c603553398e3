"""A loaded language model: the engine's Transformer, its tokenizer, stop tokens and prompt format."""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from decoding.transformer import Transformer

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

    def check_fits(self, what: str, tokens: int, room: int) -> None:
        """ValueError when a prompt of `tokens`, with `room` for the answer and the drafts, runs past
        the positions this model was trained on (it would read them with untrained rotations)."""
        if tokens + room > self.max_positions:
            raise ValueError(
                f"{what}: {tokens} tokens, and the answer needs {room} more, but {self.name} reads at most "
                f"{self.max_positions}. Remove documents, lower max new tokens or gamma, or use a model with a "
                "longer context."
            )

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

