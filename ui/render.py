"""What the page shows, as Markdown and plot data: documents, sources, statistics, upload results.

Pure functions of the data (no Gradio events, no engine), so they are tested without a server.
Document text and file names are always escaped: they are shown as written, never as markup.
"""

from __future__ import annotations

import html
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import gradio as gr
import pandas as pd

from app.conversation import FollowUp
from app.engine_label import engine_label
from app.events import STILL_READING, Preparing
from app.progress import describe
from app.reexports import Citation, DocumentInfo, Reading, Stats
from app.speedup import Speedup
from ui.upload_line import UploadLine

UNEXPECTED = "Something went wrong on the server; the details are in its log."
# The chat shows a shorter excerpt than the citation holds, so the answer stays in view.
SOURCE_EXCERPT_CHARS = 180
_MD_SPECIAL = re.compile(r"([\\`*_\[\]<>#|~])")


def md_escape(text: str) -> str:
    """Document text and file names shown as written, never as markup."""
    return _MD_SPECIAL.sub(r"\\\1", text)


def size_text(n: int) -> str:
    for unit, scale in (("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}" if n % scale else f"{n // scale} {unit}"
    return f"{n} bytes"


def upload_markdown(lines: Sequence[UploadLine]) -> str:
    marks = {"added": "✓ added", "unchanged": "✓ unchanged", "error": "✗ not indexed"}
    return "\n".join(
        f"- {marks.get(line.status, line.status)}: **{md_escape(line.name)}**"
        + (f" — {md_escape(line.message)}" if line.message else "")
        for line in lines
    )


def documents_markdown(documents: Sequence[DocumentInfo], parts: Sequence[str] = ()) -> str:
    """The document table; `parts` labels the windows of a corpus longer than the model's window."""
    if not documents:
        return "_No documents indexed yet: upload some above._"
    rows = "\n".join(
        f"| {md_escape(doc.source)} | {doc.n_pages} | {doc.n_chunks} | {doc.n_tokens:,} |" for doc in documents
    )
    total = sum(doc.n_tokens for doc in documents)
    text = (f"| Document | Pages | Chunks | Tokens |\n|---|--:|--:|--:|\n{rows}\n\n"
            f"{len(documents)} document{'s' * (len(documents) != 1)}, {total:,} tokens of long context.")
    if len(parts) > 1:
        listed = "; ".join(f"part {i}: {md_escape(label)}" for i, label in enumerate(parts, 1))
        text += (f" Longer than the model's window: for each question it reads one of {len(parts)} parts, the "
                 f"one holding most of the retrieved passages ({listed}).")
    return text


def preparing_html(event: Preparing | None) -> str:
    """The computation the engine runs for the documents now, as a bar with done/total and the ETA; '' when idle."""
    if event is None:
        return ""
    bar = f'<progress value="{event.done}" max="{max(event.total, 1)}" style="width:100%"></progress>'
    return f'<div class="preparing">{bar}<div>{html.escape(describe(event))}</div></div>'


def document_choices(documents: Sequence[DocumentInfo]) -> list[tuple[str, str]]:
    return [(doc.source, doc.doc_id) for doc in documents]


def sources_markdown(citations: Sequence[Citation], reading: Reading | None = None,
                     follow_up: FollowUp | None = None) -> str:
    if not citations:
        return ""
    items = "\n".join(
        f"{i}. **{md_escape(c.label())}**{'' if c.read else ' _(not read by the model)_'} — "
        f"{md_escape(_shorten(c.excerpt, SOURCE_EXCERPT_CHARS))}"
        for i, c in enumerate(citations, 1)
    )
    read = f"_The model {md_escape(reading.note())}._\n\n" if reading is not None else ""
    if follow_up is not None:
        read = f"_{md_escape(follow_up.note())}._\n\n{read}"
    return f"**Sources**\n\n{read}{items}"


def source_choices(citations: Sequence[Citation]) -> list[tuple[str, int]]:
    """The latest answer's sources, numbered as in the chat, for the page viewer."""
    return [(f"{i}. {c.label()}", i - 1) for i, c in enumerate(citations, 1)]


def marked_html(text: str, spans: Sequence[tuple[int, int]]) -> str:
    """Document text shown as written (escaped), the cited excerpt in <mark>."""
    out, at = [], 0
    for start, end in spans:
        if start < at:
            continue
        out += [html.escape(text[at:start]), f"<mark>{html.escape(text[start:end])}</mark>"]
        at = end
    out.append(html.escape(text[at:]))
    return f'<div class="source-text" style="white-space:pre-wrap">{"".join(out)}</div>'


def _shorten(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    cut = text[:limit].rsplit(" ", 1)[0] if " " in text[:limit] else text[:limit]
    return cut.rstrip(" .,;:…") + "…"


def _number(value: float | None, fmt: str, none: str = "n/a") -> str:
    return format(value, fmt) if value is not None else none


def _wait(stats: Stats) -> str:
    return f" ({stats.wait_s:.2f} s of it reading the documents first)" if stats.wait_s >= 0.005 else ""


def _answer_time(stats: Stats, elapsed_s: float | None) -> str:
    if stats.answer_s:
        return f"{stats.answer_s:.2f} s"
    return f"running, {elapsed_s:.1f} s so far" if elapsed_s is not None else "running"


def speedup_text(speedup: Speedup | None) -> str:
    if speedup is None:
        return "n/a"
    figure = f"{speedup.value:.2f}×" if speedup.value is not None else "n/a"
    return f"{figure} ({speedup.label})"


def stats_markdown(state: str, stats: Stats | None = None, speedup: Speedup | None = None,
                   lc_stats: Stats | None = None, elapsed_s: float | None = None) -> str:
    """The statistics panel: one table, refreshed after every target pass. elapsed_s: how long the
    answer has run so far, shown until its end-to-end time is known."""
    if stats is None:
        return f"**{state}**"
    cached = f", {stats.prefix_cached_tokens:,} from the prefix cache" if stats.prefix_cached_tokens else ""
    drafter = f"{stats.draft_context_tokens:,}" if stats.draft_context_tokens else "none"
    rows = [
        ("Method", stats.method),
        ("Acceptance rate", _number(stats.acceptance_rate, ".1%", "n/a (nothing drafted)")),
        ("Decode speed", f"{_number(stats.decode_tokens_per_s, '.2f')} tokens/s"),
        ("Mean accepted length", f"{_number(stats.mean_accepted_length, '.2f')} tokens per target pass"),
        # The wait a person sees: from the question, retrieval included (the engine's own figure otherwise).
        ("First token after", f"{stats.question_to_first_s or stats.first_token_s:.2f} s{_wait(stats)}"),
        ("Answer end to end", _answer_time(stats, elapsed_s)),
        ("Prefill", f"{stats.prefill_s:.2f} s"),
        ("Decode", f"{stats.decode_s:.2f} s"),
        ("Tokens generated / drafted / accepted", f"{stats.generated} / {stats.drafted} / {stats.accepted}"),
        ("Context tokens (target / drafter)", f"{stats.context_tokens:,} / {drafter}{cached}"),
        ("Speedup over LC decoding", md_escape(speedup_text(speedup))),
        ("Engine", md_escape(engine_label(stats.engine))),
    ]
    if lc_stats is not None:
        rows.append(("LC on the same input", f"{_number(lc_stats.decode_tokens_per_s, '.2f')} tokens/s, "
                                             f"prefill {lc_stats.prefill_s:.2f} s"))
    table = "\n".join(f"| {name} | {value} |" for name, value in rows)
    # A slow fallback (no compiler, no VNNI) is said first, where it cannot be missed.
    warning = f"> ⚠️ **Slow engine:** {md_escape(stats.engine['warning'])}\n\n" if stats.engine.get("warning") else ""
    return f"{warning}**{state}**\n\n| Statistic | Value |\n|---|---|\n{table}"


def accepted_lengths_frame(stats: Stats | None) -> pd.DataFrame:
    lengths = stats.accepted_lengths if stats is not None else []
    # Pass numbers as labels: a numeric x axis draws hairline bars, a nominal one fills the width.
    return pd.DataFrame({"target pass": [str(i) for i in range(1, len(lengths) + 1)],
                         "tokens emitted": list(lengths)})


def accepted_lengths_plot(stats: Stats | None, gamma: int) -> Any:
    frame = accepted_lengths_frame(stats)
    # The axis holds the most a pass can emit (gamma drafts + 1), so bars compare across answers;
    # labels sort as text ("10" before "2") unless the order is given.
    top = max([gamma + 1, *frame["tokens emitted"]])
    return gr.BarPlot(frame, sort=list(frame["target pass"]), y_lim=[0, top])


ASK_AGAIN = "Ask again with the full documents"
ASK_AGAIN_HINT = f"“{ASK_AGAIN}” asks it again once they are read."


def ask_again_button(still_reading: bool, documents_ready: bool) -> Any:
    """Shown under an answer given from the passages alone; it can be pressed once the documents are read."""
    label = ASK_AGAIN if documents_ready else f"{ASK_AGAIN} (they are still being read)"
    return gr.Button(value=label, visible=still_reading, interactive=documents_ready)


@dataclass
class AnswerView:
    """One assistant message while it streams: status line, answer text, sources, error."""

    status: str = "Waiting for the model"
    text: str = ""
    citations: tuple[Citation, ...] = ()
    reading: Reading | None = None  # the part of a large corpus the model read
    follow_up: FollowUp | None = None  # how a question continuing the conversation was read
    error: str | None = None
    finished: bool = False
    stopped: bool = False  # cancelled by the user: the text so far stays
    still_reading: bool = False  # answered from the passages while the documents are still being read

    @property
    def working(self) -> bool:
        return not (self.finished or self.stopped or self.error)

    def markdown(self) -> str:
        parts = []
        if self.text:
            parts.append(self.text)
        if self.error:
            parts.append(f"⚠ {md_escape(self.error)}")
        elif self.stopped and not self.finished:
            parts.append("_Stopped._")
        elif not self.finished:
            parts.append(f"_{md_escape(self.status)}…_")
        if self.still_reading and not self.error:
            parts.append(f"_{STILL_READING[0].upper()}{STILL_READING[1:]}. {ASK_AGAIN_HINT}_")
        if self.citations and not self.error:
            parts.append(sources_markdown(self.citations, self.reading, self.follow_up))
        return "\n\n".join(parts)


@dataclass
class PanelView:
    """The statistics panel: a heading, and the latest statistics once there are some."""

    heading: str
    stats: Stats | None = None
    speedup: Speedup | None = None
    lc_stats: Stats | None = None
    elapsed_s: float | None = None  # while the answer runs

    def markdown(self) -> str:
        return stats_markdown(self.heading, self.stats, self.speedup, self.lc_stats, self.elapsed_s)
