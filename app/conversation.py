"""A conversation's earlier exchanges: how many the prompts keep, and the follow-up rewritten for retrieval.

The history goes into the prompts after the documents (decoding.loaded_model.LoadedModel.prompt), so the
documents' cached KV serves every turn. Retrieval cannot read a history: "and for DBF files?" finds
nothing useful alone, so the drafter first rewrites such a follow-up into a standalone question.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

# The rewrite reads the latest exchanges only: a follow-up refers to what was just said, and the
# drafter's prefill of a long history would delay every answer.
REWRITE_TURNS = 3
REWRITE_TOKENS = 48  # a question, not an answer: greedy, a few dozen tokens
REWRITE_SYSTEM = (
    "You rewrite the user's last question so that it can be understood without the conversation before it. "
    "Replace pronouns and implied subjects by what they refer to. Keep the meaning; do not answer. "
    "Reply with the rewritten question only, on one line."
)


def _example(question: str, answer: str, follow_up: str, standalone: str) -> tuple[str, str]:
    return rewrite_request([Turn(question, answer)], follow_up), standalone


def rewrite_examples() -> list[tuple[str, str]]:
    """Worked rewrites shown to the drafter before the real one (a small model copies a pattern
    more reliably than it follows an instruction)."""
    return [
        _example("How do I install a package?", "Use install.packages().", "And how do I remove one?",
                 "How do I remove an installed package?"),
        _example("Which city hosts the conference?", "Vienna.", "When does it start there?",
                 "When does the conference in Vienna start?"),
    ]


@dataclass(frozen=True)
class Turn:
    """One finished exchange of a conversation: the user's question and the answer given."""

    question: str
    answer: str


@dataclass(frozen=True)
class FollowUp:
    """How a question that continues a conversation was read."""

    standalone: str  # the question rewritten to stand alone: what retrieval searched for
    turns: int  # earlier exchanges the prompts hold
    dropped: int  # the oldest exchanges left out, for the prompt's room

    def note(self) -> str:
        kept = f"with the {self.turns} earlier exchange{'s' if self.turns != 1 else ''} of this conversation"
        cut = (f"; the {self.dropped} oldest exchange{'s were' if self.dropped != 1 else ' was'} left out "
               "to fit the prompt" if self.dropped else "")
        return f"Searched for: “{self.standalone}” (answered {kept}{cut})"


def pairs(turns: Sequence[Turn]) -> list[tuple[str, str]]:
    """Turns as decoding.loaded_model.LoadedModel.prompt takes them."""
    return [(turn.question, turn.answer) for turn in turns]


def fit_history(history: Sequence[Turn], tokens: Callable[[Sequence[Turn]], int], budget: int) -> tuple[Turn, ...]:
    """The latest exchanges whose prompt text takes at most `budget` tokens, cutting from the oldest."""
    kept = tuple(history)
    while kept and tokens(kept) > budget:
        kept = kept[1:]
    return kept


def rewrite_request(history: Sequence[Turn], question: str) -> str:
    """The user message asking the drafter for the standalone question."""
    lines = [f"User: {turn.question}\nAssistant: {turn.answer}" for turn in history[-REWRITE_TURNS:]]
    return "Conversation:\n" + "\n".join(lines) + f"\n\nLast question: {question}\n\nStandalone question:"


def standalone_from(generated: str) -> str:
    """The rewrite's first line, without a label or quotes the model may add."""
    line = generated.strip().split("\n", 1)[0].strip()
    for label in ("Standalone question:", "Question:"):
        line = line.removeprefix(label).strip()
    return line.strip("\"“”").strip()
