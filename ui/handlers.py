"""What the page does: one Handlers object per page holds the engine and the index every session
shares, and one method per UI event or API endpoint (ui/blocks.py lays the page out and wires them).

No `from __future__ import annotations` in this module: gr.api reads the API endpoints' type
hints at runtime to describe them, and string annotations would break that.
"""

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import gradio as gr

from app.config import Settings
from app.conversation import Turn
from app.errors import user_message
from app.events import Done, Preparing, Progress, Sources, Status, StillReading, Token
from app.pipeline import Engine
from app.progress import describe
from app.reexports import (
    Citation,
    DecodingSettings,
    HybridIndex,
    kept_file,
    pdf_page_image,
    surrounding_text,
)
from app.report import reading_record, sources_record, speedup_record, stats_record, still_reading_record
from ui.render import (
    UNEXPECTED,
    AnswerView,
    PanelView,
    accepted_lengths_plot,
    ask_again_button,
    document_choices,
    documents_markdown,
    marked_html,
    md_escape,
    preparing_html,
    source_choices,
    upload_markdown,
)
from ui.uploads import ingest_uploads

logger = logging.getLogger("rapidqa.ui")


@dataclass
class Showing:
    """What the latest answer shows, kept as data so that Stop re-renders it instead of editing its Markdown."""

    view: AnswerView
    panel: PanelView


def decoding_for(settings: Settings, method: str, eta: float, gamma: float, temperature: float,
                 max_new_tokens: float) -> DecodingSettings:
    return replace(settings.decoding, method=method, eta=float(eta), gamma=int(gamma),
                   temperature=float(temperature), max_new_tokens=int(max_new_tokens))


def _user_text(error: Exception) -> str:
    message = user_message(error)
    if message is None:
        logger.exception("answering failed")
        return UNEXPECTED
    return message


class Handlers:
    """The page's event handlers over one engine and one index (shared by every browser session)."""

    def __init__(self, engine: Engine, index: HybridIndex) -> None:
        self.engine, self.index = engine, index
        self.settings = engine.settings
        self.uploads_dir = engine.settings.uploads_dir
        self.limits = engine.settings.limits

    def refresh_documents(self) -> tuple[str, Any]:
        """The document list and the delete dropdown, as the index holds them now."""
        documents = self.index.documents()
        return (documents_markdown(documents, self.engine.reading_parts(self.index)),
                gr.Dropdown(choices=document_choices(documents), value=None))

    def on_upload(self, files: list[str] | None) -> tuple[str, str, Any, None]:
        lines = ingest_uploads(self.index, [Path(f) for f in files or []], self.uploads_dir, self.limits)
        self.engine.prepare_in_background(self.index)  # the documents' KV, so the first question need not wait
        return (upload_markdown(lines) or "_No files received._", *self.refresh_documents(), None)

    def on_delete(self, doc_id: str | None) -> tuple[str, str, Any]:
        if not doc_id:
            return "Choose a document to delete first.", *self.refresh_documents()
        name = next((d.source for d in self.index.documents() if d.doc_id == doc_id), doc_id)
        try:
            removed = self.engine.delete(self.index, doc_id)
        except Exception as error:
            message = user_message(error)
            if message is None:
                logger.exception("deleting %s failed", name)
            failed = f"✗ **{md_escape(name)}** was not deleted: {md_escape(message or UNEXPECTED)}"
            return failed, *self.refresh_documents()
        if removed:
            self.engine.prepare_in_background(self.index)  # the documents' KV from the first changed one on
        text = f"✓ deleted **{md_escape(name)}**" if removed else f"**{md_escape(name)}** was already gone."
        return text, *self.refresh_documents()

    def on_ask(self, question: str, history: list[dict[str, Any]] | None, turns: list[list[str]] | None, method: str,
               eta: float, gamma: float, temperature: float, max_new_tokens: float, compare: bool,
               budget: float) -> Iterator[tuple[Any, ...]]:
        """Stream one answer into the chat; statistics and plot follow each target pass. `turns`: the
        conversation's finished exchanges, (question, answer), which the answer continues."""
        history = list(history or [])
        conversation = [Turn(q, a) for q, a in turns or []]
        if not (question or "").strip():
            gr.Warning("Type a question first.")
            yield gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
            return
        shown = Showing(AnswerView(), PanelView("Retrieving passages…"))
        view = shown.view
        history += [{"role": "user", "content": question}, {"role": "assistant", "content": view.markdown()}]
        yield (history, "", shown.panel.markdown(), accepted_lengths_plot(None, int(gamma)), shown, gr.skip(),
               gr.Radio(choices=[], value=None))
        started = time.perf_counter()
        try:
            decoding = decoding_for(self.settings, method, eta, gamma, temperature, max_new_tokens)
            retrieval = replace(self.settings.retrieval, budget_min_tokens=int(budget))
            # closing(): a cancelled or abandoned answer must release the engine's generate lock now.
            answering = self.engine.answer(question, self.index, decoding, bool(compare), retrieval,
                                           history=conversation)
            with contextlib.closing(answering) as events:
                for event in events:
                    panel: Any = gr.skip()
                    plot: Any = gr.skip()
                    finished: Any = gr.skip()
                    choices: Any = gr.skip()
                    if isinstance(event, Status):
                        view.status = event.message
                        view.still_reading = view.still_reading or isinstance(event, StillReading)
                        if shown.panel.stats is not None:  # e.g. the LC run of a comparison
                            shown.panel = PanelView(f"{event.message}…", shown.panel.stats)
                            panel = shown.panel.markdown()
                    elif isinstance(event, Preparing):
                        view.status = describe(event)
                    elif isinstance(event, Sources):
                        view.citations, view.reading = tuple(event.citations), event.reading
                        view.follow_up = event.follow_up
                        choices = gr.Radio(choices=source_choices(event.citations), value=None)
                    elif isinstance(event, Token):
                        view.text += event.text
                        view.status = "Generating"
                    elif isinstance(event, Progress):
                        shown.panel = PanelView("Generating…", event.stats, event.speedup,
                                                elapsed_s=time.perf_counter() - started)
                        panel = shown.panel.markdown()
                        plot = accepted_lengths_plot(event.stats, decoding.gamma)
                    elif isinstance(event, Done):
                        view.text, view.citations, view.finished = event.answer, tuple(event.citations), True
                        view.reading, view.follow_up = event.reading, event.follow_up
                        finished = [*(turns or []), [question, event.answer]]
                        choices = gr.Radio(choices=source_choices(event.citations), value=None)
                        elapsed = time.perf_counter() - started
                        reason = f", stopped by {event.stats.finish_reason}" if event.stats.finish_reason else ""
                        shown.panel = PanelView(f"Answer complete in {elapsed:.1f} s{reason}", event.stats,
                                                event.speedup, event.lc_stats)
                        panel = shown.panel.markdown()
                        plot = accepted_lengths_plot(event.stats, decoding.gamma)
                    history[-1] = {"role": "assistant", "content": view.markdown()}
                    yield history, gr.skip(), panel, plot, shown, finished, choices
        except Exception as error:
            view.error = _user_text(error)
            shown.panel = PanelView("No answer: see the message in the chat.")
            history[-1] = {"role": "assistant", "content": view.markdown()}
            yield history, gr.skip(), shown.panel.markdown(), gr.skip(), shown, gr.skip(), gr.skip()

    def on_ask_again(self, history: list[dict[str, Any]] | None, turns: list[list[str]] | None, method: str,
                     eta: float, gamma: float, temperature: float, max_new_tokens: float, compare: bool,
                     budget: float) -> Iterator[tuple[Any, ...]]:
        """The latest question again, now that its documents are read: the answer from the passages
        stays in the chat, but the conversation continues from the new answer instead of it."""
        if not turns:
            gr.Warning("There is no question to ask again.")
            yield gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
            return
        question = turns[-1][0]
        yield from self.on_ask(question, history, turns[:-1], method, eta, gamma, temperature, max_new_tokens,
                               compare, budget)

    def ask_again(self, shown: Showing | None) -> Any:
        """The "ask again" button's state: shown after an answer from the passages alone, pressable
        once nothing is reading the documents any more (the page polls it)."""
        still_reading = shown is not None and shown.view.finished and shown.view.still_reading
        return ask_again_button(still_reading, self.engine.documents_ready(self.index))

    def on_source(self, choice: int | None, shown: Showing | None) -> tuple[str, Any, Any]:
        """A source of the latest answer, opened: its PDF page with the excerpt marked, or the text around it."""
        hidden_page, hidden_text = gr.Image(value=None, visible=False), gr.HTML(value="", visible=False)
        citations = shown.view.citations if shown is not None else ()
        if choice is None or not 0 <= int(choice) < len(citations):
            return "", hidden_page, hidden_text
        cited = citations[int(choice)]
        label = md_escape(cited.label())
        try:
            return self._show_source(cited, label, hidden_page, hidden_text)
        except Exception as error:
            return f"**{label}** could not be shown: {md_escape(_user_text(error))}", hidden_page, hidden_text

    def _show_source(self, cited: Citation, label: str, hidden_page: Any, hidden_text: Any) -> tuple[str, Any, Any]:
        document = next((d for d in self.index.documents() if d.source == cited.source), None)
        if document is None:
            return f"**{label}**: this document is no longer indexed.", hidden_page, hidden_text
        is_pdf = cited.source.lower().endswith(".pdf") and cited.page is not None
        kept = kept_file(self.uploads_dir, cited.source, document.sha256) if is_pdf else None
        if kept is not None and cited.page is not None:
            image, found = pdf_page_image(kept, cited.page, cited.excerpt)
            how = "the cited excerpt is marked" if found else "the excerpt could not be located on the page"
            return f"**{label}**: {how}.", gr.Image(value=image, visible=True), hidden_text
        marked = surrounding_text(self.index, cited.source, cited.page, cited.section, cited.excerpt)
        if marked is None:
            return f"**{label}**: the excerpt is no longer in the indexed text.", hidden_page, hidden_text
        why = " (this server keeps no copy of the PDF: the indexed text is shown)" if is_pdf else ""
        return (f"**{label}**: the cited passage, excerpt marked{why}.", hidden_page,
                gr.HTML(value=marked_html(marked.text, marked.spans), visible=True))

    def on_stop(self, history: list[dict[str, Any]] | None, shown: Showing | None) -> tuple[Any, Any, Any]:
        """After a cancel: the answer so far stays, and both it and the panel say it was stopped."""
        history = list(history or [])
        if shown is None or not shown.view.working or not history or history[-1].get("role") != "assistant":
            return gr.skip(), gr.skip(), gr.skip()
        shown.view.stopped = True
        shown.panel = replace(shown.panel, heading="Stopped.")
        history[-1] = {"role": "assistant", "content": shown.view.markdown()}
        return history, shown.panel.markdown(), shown

    def ask(self, question: str, method: str, max_new_tokens: int) -> tuple[str, dict[str, Any], list[dict[str, Any]]]:
        """The /ask API: answer a question about the indexed documents; (answer, statistics, sources)."""
        decoding = replace(self.settings.decoding, method=method, max_new_tokens=int(max_new_tokens))
        done: Done | None = None
        try:
            with contextlib.closing(self.engine.answer(question, self.index, decoding)) as events:
                done = next((e for e in events if isinstance(e, Done)), None)
        except Exception as error:
            raise gr.Error(_user_text(error), print_exception=False) from None
        if done is None:
            raise gr.Error(UNEXPECTED, print_exception=False)
        # The layout of `ask --json`, so a script can switch between the two.
        stats = (stats_record(done.stats) | speedup_record(done.speedup) | {"read": reading_record(done.reading)}
                 | {"still_reading": still_reading_record(done.still_reading)})
        return done.answer, stats, sources_record(done.citations)

    def upload_api(self, files: list[str] | None) -> dict[str, Any]:
        lines = ingest_uploads(self.index, [Path(f) for f in files or []], self.uploads_dir, self.limits)
        self.engine.prepare_in_background(self.index)
        return {"files": [line.to_dict() for line in lines],
                "documents": [{"document": d.source, "doc_id": d.doc_id, "pages": d.n_pages,
                               "chunks": d.n_chunks, "tokens": d.n_tokens} for d in self.index.documents()]}

    def preparing(self) -> str:
        """The background preparation's progress, for the page's poll."""
        return preparing_html(self.engine.preparing())
