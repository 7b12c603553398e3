"""A conversation's earlier exchanges, as the prompts and the retrieval rewrite read them."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Turn:
    """One finished exchange of a conversation: the user's question and the answer given."""

    question: str
    answer: str
