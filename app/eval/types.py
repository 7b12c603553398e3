"""The records eval's runner and scoring share: a labelled question and a method's row of the table."""

from __future__ import annotations

from dataclasses import dataclass

from decoding.settings import DecodingSettings


@dataclass(frozen=True)
class QAItem:
    id: str
    question: str
    answers: list[str]
    page: int | None = None
    position: str | None = None  # beginning | middle | end of the document
    source: str | None = None  # the document holding `page`, when the corpus has several
    section: str | None = None  # the section holding the answer, in documents without pages
    hops: int | None = None  # 2: the answer needs two places in the document
    split: str | None = None  # tune | report: which half of a labelled set (fixed by document)


@dataclass(frozen=True)
class MethodRun:
    """One row of the result table: a method with its settings (a rapid sweep point is its own row)."""

    label: str
    decoding: DecodingSettings
    budget: int | None = None  # the retrieved passages' token budget; None: the settings' rule
    style: str | None = None  # app.answer_style; None: the settings'
