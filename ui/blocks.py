"""The page: Gradio Blocks over app.pipeline, and its API (/ask, /upload).

One Engine (models loaded once) and one HybridIndex serve every browser session and API client.
Per-session state (chat history, what the latest answer shows) lives in Gradio's component
values, so nothing here is shared between sessions except the engine and the index.

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
from app.events import Done, Preparing, Progress, Sources, Status, Token
from app.pipeline import Engine
from app.presets import FAST, PRESETS
from app.progress import describe
from app.reexports import (
    METHODS,
    Citation,
    DecodingSettings,
    kept_file,
    pdf_page_image,
    supported_extensions,
    surrounding_text,
)
from app.report import reading_record, sources_record, speedup_record, stats_record
from ui.render import (
    UNEXPECTED,
    AnswerView,
    PanelView,
    accepted_lengths_frame,
    accepted_lengths_plot,
    document_choices,
    documents_markdown,
    marked_html,
    md_escape,
    preparing_html,
    size_text,
    source_choices,
    stats_markdown,
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


def build_app(engine: Engine, index_dir: Path | None = None) -> gr.Blocks:
    """The page and its API; every session shares `engine` and the index at `index_dir`."""
    settings = engine.settings
    index = engine.open_index(index_dir)
    uploads_dir = settings.uploads_dir
    limits = settings.limits
    default = settings.decoding

    def refresh_documents() -> tuple[str, Any]:
        documents = index.documents()
        return (documents_markdown(documents, engine.reading_parts(index)),
                gr.Dropdown(choices=document_choices(documents), value=None))

    def on_upload(files: list[str] | None) -> tuple[str, str, Any, None]:
        lines = ingest_uploads(index, [Path(f) for f in files or []], uploads_dir, limits)
        engine.prepare_in_background(index)  # the documents' KV, so the first question need not wait
        return (upload_markdown(lines) or "_No files received._", *refresh_documents(), None)

    def on_delete(doc_id: str | None) -> tuple[str, str, Any]:
        if not doc_id:
            return "Choose a document to delete first.", *refresh_documents()
        name = next((d.source for d in index.documents() if d.doc_id == doc_id), doc_id)
        try:
            removed = engine.delete(index, doc_id)
        except Exception as error:
            message = user_message(error)
            if message is None:
                logger.exception("deleting %s failed", name)
            return f"✗ **{md_escape(name)}** was not deleted: {md_escape(message or UNEXPECTED)}", *refresh_documents()
        if removed:
            engine.prepare_in_background(index)  # the documents' KV from the first changed one on
        text = f"✓ deleted **{md_escape(name)}**" if removed else f"**{md_escape(name)}** was already gone."
        return text, *refresh_documents()

    def on_ask(question: str, history: list[dict[str, Any]] | None, turns: list[list[str]] | None, method: str,
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
            decoding = decoding_for(settings, method, eta, gamma, temperature, max_new_tokens)
            retrieval = replace(settings.retrieval, budget_min_tokens=int(budget))
            # closing(): a cancelled or abandoned answer must release the engine's generate lock now.
            answering = engine.answer(question, index, decoding, bool(compare), retrieval, history=conversation)
            with contextlib.closing(answering) as events:
                for event in events:
                    panel: Any = gr.skip()
                    plot: Any = gr.skip()
                    finished: Any = gr.skip()
                    choices: Any = gr.skip()
                    if isinstance(event, Status):
                        view.status = event.message
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

    def on_source(choice: int | None, shown: Showing | None) -> tuple[str, Any, Any]:
        """A source of the latest answer, opened: its PDF page with the excerpt marked, or the text around it."""
        hidden_page, hidden_text = gr.Image(value=None, visible=False), gr.HTML(value="", visible=False)
        citations = shown.view.citations if shown is not None else ()
        if choice is None or not 0 <= int(choice) < len(citations):
            return "", hidden_page, hidden_text
        cited = citations[int(choice)]
        label = md_escape(cited.label())
        try:
            return show_source(cited, label, hidden_page, hidden_text)
        except Exception as error:
            return f"**{label}** could not be shown: {md_escape(_user_text(error))}", hidden_page, hidden_text

    def show_source(cited: Citation, label: str, hidden_page: Any, hidden_text: Any) -> tuple[str, Any, Any]:
        document = next((d for d in index.documents() if d.source == cited.source), None)
        if document is None:
            return f"**{label}**: this document is no longer indexed.", hidden_page, hidden_text
        is_pdf = cited.source.lower().endswith(".pdf") and cited.page is not None
        kept = kept_file(uploads_dir, cited.source, document.sha256) if is_pdf else None
        if kept is not None and cited.page is not None:
            image, found = pdf_page_image(kept, cited.page, cited.excerpt)
            how = "the cited excerpt is marked" if found else "the excerpt could not be located on the page"
            return f"**{label}**: {how}.", gr.Image(value=image, visible=True), hidden_text
        marked = surrounding_text(index, cited.source, cited.page, cited.section, cited.excerpt)
        if marked is None:
            return f"**{label}**: the excerpt is no longer in the indexed text.", hidden_page, hidden_text
        why = " (this server keeps no copy of the PDF: the indexed text is shown)" if is_pdf else ""
        return (f"**{label}**: the cited passage, excerpt marked{why}.", hidden_page,
                gr.HTML(value=marked_html(marked.text, marked.spans), visible=True))

    def on_stop(history: list[dict[str, Any]] | None, shown: Showing | None) -> tuple[Any, Any, Any]:
        """After a cancel: the answer so far stays, and both it and the panel say it was stopped."""
        history = list(history or [])
        if shown is None or not shown.view.working or not history or history[-1].get("role") != "assistant":
            return gr.skip(), gr.skip(), gr.skip()
        shown.view.stopped = True
        shown.panel = replace(shown.panel, heading="Stopped.")
        history[-1] = {"role": "assistant", "content": shown.view.markdown()}
        return history, shown.panel.markdown(), shown

    def ask(question: str, method: str = default.method,
            max_new_tokens: int = default.max_new_tokens) -> tuple[str, dict[str, Any], list[dict[str, Any]]]:
        """Answer a question about the indexed documents. Returns (answer, statistics, sources)."""
        decoding = replace(default, method=method, max_new_tokens=int(max_new_tokens))
        done: Done | None = None
        try:
            with contextlib.closing(engine.answer(question, index, decoding)) as events:
                done = next((e for e in events if isinstance(e, Done)), None)
        except Exception as error:
            raise gr.Error(_user_text(error), print_exception=False) from None
        if done is None:
            raise gr.Error(UNEXPECTED, print_exception=False)
        # The layout of `ask --json`, so a script can switch between the two.
        stats = stats_record(done.stats) | speedup_record(done.speedup) | {"read": reading_record(done.reading)}
        return done.answer, stats, sources_record(done.citations)

    def upload_api(files: list[str] | None) -> dict[str, Any]:
        lines = ingest_uploads(index, [Path(f) for f in files or []], uploads_dir, limits)
        engine.prepare_in_background(index)
        return {"files": [line.to_dict() for line in lines],
                "documents": [{"document": d.source, "doc_id": d.doc_id, "pages": d.n_pages,
                               "chunks": d.n_chunks, "tokens": d.n_tokens} for d in index.documents()]}

    types = ", ".join(ext.lstrip(".").upper() for ext in supported_extensions())
    # delete_cache: Gradio keeps its own copy of every upload; ours is in uploads_dir, so drop
    # Gradio's after an hour rather than keep documents in /tmp forever.
    with gr.Blocks(title="rapidqa", analytics_enabled=False, fill_width=True, delete_cache=(3600, 3600)) as demo:
        gr.Markdown(
            "# rapidqa — ask your documents\n"
            "A small drafter reads the retrieved passages, the long-context target reads every document "
            "and verifies the draft (RAPID speculative decoding)."
        )
        with gr.Row(equal_height=False):
            with gr.Column(scale=2, min_width=320):
                gr.Markdown("### Documents")
                files = gr.File(
                    label=f"Upload documents ({types}; up to {limits.max_files_per_upload} files, "
                          f"{size_text(limits.max_upload_bytes)} each)",
                    file_count="multiple", elem_id="upload", height=120,
                )
                upload_status = gr.Markdown(elem_id="upload-status")
                documents = gr.Markdown(documents_markdown(index.documents(), engine.reading_parts(index)),
                                        elem_id="documents")
                # The documents' KV builds in the background after an upload: its progress, polled.
                preparing = gr.HTML(elem_id="preparing")
                poll = gr.Timer(1.0)
                with gr.Row():
                    doc_choice = gr.Dropdown(label="Remove a document", choices=document_choices(index.documents()),
                                             value=None, scale=3, elem_id="delete-choice")
                    delete = gr.Button("Delete", variant="stop", scale=1, min_width=80, elem_id="delete")
                delete_status = gr.Markdown(elem_id="delete-status")
            with gr.Column(scale=3, min_width=420):
                chatbot = gr.Chatbot(label="Answers", show_label=False, elem_id="chat", height=520, buttons=["copy"],
                                     feedback_options=None,
                                     placeholder="Upload documents, then ask a question about them.")
                question = gr.Textbox(label="Question", placeholder="Ask about the documents…", lines=2,
                                      max_length=limits.max_question_chars, elem_id="question", submit_btn=False)
                with gr.Row():
                    ask_button = gr.Button("Ask", variant="primary", elem_id="ask")
                    stop = gr.Button("Stop", elem_id="stop")
                    new_chat = gr.ClearButton(value="New chat", elem_id="new-chat")
                    compare = gr.Checkbox(label="Compare with LC (measures the speedup side by side; slower)",
                                          value=False, elem_id="compare")
                mode = gr.Radio([(p.label, p.name) for p in PRESETS.values()], value=FAST.name, label="Answer mode",
                                elem_id="mode")
                with gr.Accordion("Settings", open=False, elem_id="settings"):
                    method = gr.Dropdown(label="Method", choices=[(m.label, m.name) for m in METHODS.values()],
                                         value=default.method, elem_id="method")
                    with gr.Row():
                        eta = gr.Slider(0, 50, value=default.eta, step=0.5,
                                        label="eta (RAPID target strength; 0 = exact)")
                        gamma = gr.Slider(1, 16, value=default.gamma, step=1, label="gamma (drafted tokens per pass)")
                    with gr.Row():
                        temperature = gr.Slider(0, 2, value=default.temperature, step=0.05,
                                                label="temperature (0 = greedy)")
                        max_new_tokens = gr.Slider(1, limits.max_new_tokens, step=1, label="max new tokens",
                                                   value=min(default.max_new_tokens, limits.max_new_tokens),
                                                   elem_id="max-new-tokens")
                    budget = gr.Slider(256, 8192, step=256, value=settings.retrieval.budget_min_tokens,
                                       label="retrieval budget (drafter context, tokens; at least |C|/24)",
                                       elem_id="budget")
            with gr.Column(scale=2, min_width=320):
                gr.Markdown("### Statistics")
                stats_panel = gr.Markdown(stats_markdown("Statistics appear here while an answer is generated."),
                                          elem_id="stats")
                plot = gr.BarPlot(accepted_lengths_frame(None), x="target pass", y="tokens emitted",
                                  title="Tokens emitted per target pass", height=220, elem_id="pass-plot",
                                  y_lim=[0, default.gamma + 1])
                gr.Markdown("### Open a source")
                source_choice = gr.Radio(label="Sources of the latest answer", choices=[], elem_id="source-choice")
                source_note = gr.Markdown(elem_id="source-note")
                source_page = gr.Image(label="Cited page", type="pil", interactive=False, visible=False,
                                       elem_id="source-page", buttons=["fullscreen"])
                source_text = gr.HTML(visible=False, elem_id="source-text")
        showing = gr.State(None)  # the latest answer's Showing, for Stop
        # The conversation's finished exchanges, [question, answer], which a follow-up continues.
        turns = gr.State([])
        new_chat.add([chatbot, stats_panel, showing, turns, source_choice, source_note, source_page, source_text])

        files.upload(on_upload, [files], [upload_status, documents, doc_choice, files],
                     api_visibility="private")
        delete.click(on_delete, [doc_choice], [delete_status, documents, doc_choice], api_visibility="private")
        answering = gr.on(
            [ask_button.click, question.submit], on_ask,
            [question, chatbot, turns, method, eta, gamma, temperature, max_new_tokens, compare, budget],
            [chatbot, question, stats_panel, plot, showing, turns, source_choice], api_visibility="private",
            show_progress="minimal",
        )
        stop.click(on_stop, [chatbot, showing], [chatbot, stats_panel, showing], cancels=[answering],
                   api_visibility="private", queue=False)
        source_choice.change(on_source, [source_choice, showing], [source_note, source_page, source_text],
                             api_visibility="private")
        demo.load(refresh_documents, None, [documents, doc_choice], api_visibility="private")
        # A mode sets the method and its knobs, which stay visible and adjustable under Settings.
        mode.change(lambda name: (PRESETS[name].method, PRESETS[name].eta, PRESETS[name].gamma), [mode],
                    [method, eta, gamma], api_visibility="private", queue=False)
        poll.tick(lambda: preparing_html(engine.preparing()), None, preparing, api_visibility="private",
                  show_progress="hidden", queue=False)

        # API: `ask` takes plain values; `upload` goes through a (hidden) File component so that
        # Gradio checks the file paths a client sends are its own uploads, not server files.
        gr.api(ask, api_name="ask")
        api_files = gr.File(file_count="multiple", visible=False)
        api_result = gr.JSON(visible=False)
        api_trigger = gr.Button(visible=False)
        api_trigger.click(upload_api, [api_files], [api_result], api_name="upload")
    return demo
