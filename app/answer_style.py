"""How an answer is asked to be shaped: an instruction that follows the question in the user's turn.

It goes after the question, never into the system prompt, so the documents' cached KV (which
follows the system prompt) serves every style. Retrieval searches for the question alone.
"""

from __future__ import annotations

BRIEF = "brief"  # the system prompt's own "answer briefly": no added instruction
LEAD = "lead"
STYLES: dict[str, str] = {
    BRIEF: "",
    LEAD: "Answer in your first sentence, then give one sentence of support from the documents.",
}


def check_style(style: str) -> None:
    if style not in STYLES:
        raise ValueError(f"answer style {style!r}: choose one of {', '.join(STYLES)}")


def styled_question(question: str, style: str) -> str:
    """The question as the prompt asks it."""
    check_style(style)
    instruction = STYLES[style]
    return f"{question}\n\n{instruction}" if instruction else question
