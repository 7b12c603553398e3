"""The one table of decoding methods: what each reads, who drafts, and what applies to it.

The loop, the pipeline, eval, bench and the UI read this table instead of comparing method names.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Drafting(Enum):
    NONE = "none"  # the target alone, one token per pass
    LOOKUP = "lookup"  # n-gram continuations from the target's own prompt and answer
    RAG_MODEL = "rag model"  # the drafter model on the retrieved passages (RAPID)
    LONG_MODEL = "long model"  # the drafter model on the whole documents (SD)
    WINDOW = "window"  # the target itself on a StreamingLLM window of its cache (MagicDec)
    # The target itself on the slots of its own cache that hold the retrieved passages (with the
    # prompt's header and question): a RAG drafter as strong as the target, with nothing to prefill.
    FOCUS = "focus"


@dataclass(frozen=True)
class Method:
    name: str
    label: str  # one line for menus and tables
    target_reads_rag: bool  # the target reads the retrieved passages instead of the documents
    drafting: Drafting
    eta_applies: bool  # the retrieval-augmented target distribution (eta > 0) is used
    # The target drafts for itself on the drafter's context: a drafter as strong as the target is
    # what lets eta > 0 improve answers (paper, Table 1) instead of pulling towards a weaker model.
    drafter_is_target: bool = False

    @property
    def drafts_with_model(self) -> bool:
        """A model (the drafter, or the target itself) drafts from its own prompt and cache."""
        return self.drafting in (Drafting.RAG_MODEL, Drafting.LONG_MODEL)

    @property
    def runs_drafter_model(self) -> bool:
        """Whether the separate drafter model is loaded and run."""
        return self.drafts_with_model and not self.drafter_is_target

    @property
    def speculative(self) -> bool:
        return self.drafting is not Drafting.NONE

    @property
    def needs_rag_prompt(self) -> bool:
        return self.target_reads_rag or self.drafting is Drafting.RAG_MODEL

    @property
    def uses_prefix_cache(self) -> bool:
        """The target's document prefix is worth caching: it reads the documents, not a per-question context."""
        return not self.target_reads_rag


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("rapid", "RAPID: RAG drafter + long-context target", False, Drafting.RAG_MODEL, True),
        Method("rapid-self", "RAPID, target as its own RAG drafter (the quality mode, eta > 0)", False,
               Drafting.RAG_MODEL, True, drafter_is_target=True),
        Method("rapid-focus", "RAPID, target drafts from the retrieved passages in its own cache", False,
               Drafting.FOCUS, True, drafter_is_target=True),
        Method("lc", "LC: target alone on everything (the baseline)", False, Drafting.NONE, False),
        Method("rag", "RAG: model alone on the retrieved passages", True, Drafting.NONE, False),
        Method("sd", "SD: speculative decoding, exact (eta = 0)", False, Drafting.LONG_MODEL, False),
        Method("magicdec", "MagicDec: target drafts with a StreamingLLM cache", False, Drafting.WINDOW, False),
        Method("lookup", "Lookup: n-gram prompt-lookup drafting", False, Drafting.LOOKUP, False),
    )
}
BASELINE = "lc"  # speedups are measured against this method on the same input


def method_info(name: str) -> Method:
    """The table entry for a method name; KeyError names the choices."""
    try:
        return METHODS[name]
    except KeyError:
        raise KeyError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}") from None
