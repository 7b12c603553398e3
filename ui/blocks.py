"""The page's layout: Gradio Blocks wired to ui.handlers.Handlers, and its API (/ask, /upload).

One Engine (models loaded once) and one HybridIndex serve every browser session and API client.
Per-session state (chat history, what the latest answer shows) lives in Gradio's component
values, so nothing here is shared between sessions except the engine and the index.

No `from __future__ import annotations` in this module: gr.api reads the API endpoints' type
hints at runtime to describe them, and string annotations would break that.
"""

from pathlib import Path
from typing import Any

import gradio as gr

from app.pipeline import Engine
from app.presets import FAST, PRESETS
from app.reexports import METHODS, supported_extensions
from ui.handlers import Handlers
from ui.render import ASK_AGAIN, accepted_lengths_frame, document_choices, documents_markdown, size_text, stats_markdown


def build_app(engine: Engine, index_dir: Path | None = None) -> gr.Blocks:
    """The page and its API; every session shares `engine` and the index at `index_dir`."""
    handlers = Handlers(engine, engine.open_index(index_dir))
    index = handlers.index
    settings = engine.settings
    limits = settings.limits
    default = settings.decoding

    def ask(question: str, method: str = default.method,
            max_new_tokens: int = default.max_new_tokens) -> tuple[str, dict[str, Any], list[dict[str, Any]]]:
        """Answer a question about the indexed documents. Returns (answer, statistics, sources)."""
        return handlers.ask(question, method, max_new_tokens)

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
                # After an answer given from the passages while the documents were being read.
                ask_again = gr.Button(ASK_AGAIN, visible=False, interactive=False, elem_id="ask-again")
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

        files.upload(handlers.on_upload, [files], [upload_status, documents, doc_choice, files],
                     api_visibility="private")
        delete.click(handlers.on_delete, [doc_choice], [delete_status, documents, doc_choice], api_visibility="private")
        answering = gr.on(
            [ask_button.click, question.submit], handlers.on_ask,
            [question, chatbot, turns, method, eta, gamma, temperature, max_new_tokens, compare, budget],
            [chatbot, question, stats_panel, plot, showing, turns, source_choice], api_visibility="private",
            show_progress="minimal",
        )
        answering.then(handlers.ask_again, [showing], [ask_again], api_visibility="private", queue=False)
        asking_again = ask_again.click(
            handlers.on_ask_again, [chatbot, turns, method, eta, gamma, temperature, max_new_tokens, compare, budget],
            [chatbot, question, stats_panel, plot, showing, turns, source_choice], api_visibility="private",
            show_progress="minimal",
        )
        asking_again.then(handlers.ask_again, [showing], [ask_again], api_visibility="private", queue=False)
        stop.click(handlers.on_stop, [chatbot, showing], [chatbot, stats_panel, showing],
                   cancels=[answering, asking_again], api_visibility="private", queue=False)
        source_choice.change(handlers.on_source, [source_choice, showing], [source_note, source_page, source_text],
                             api_visibility="private")
        demo.load(handlers.refresh_documents, None, [documents, doc_choice], api_visibility="private")
        # A mode sets the method and its knobs, which stay visible and adjustable under Settings.
        mode.change(lambda name: (PRESETS[name].method, PRESETS[name].eta, PRESETS[name].gamma), [mode],
                    [method, eta, gamma], api_visibility="private", queue=False)
        poll.tick(handlers.preparing, None, preparing, api_visibility="private",
                  show_progress="hidden", queue=False)
        poll.tick(handlers.ask_again, [showing], [ask_again], api_visibility="private",
                  show_progress="hidden", queue=False)

        # API: `ask` takes plain values; `upload` goes through a (hidden) File component so that
        # Gradio checks the file paths a client sends are its own uploads, not server files.
        gr.api(ask, api_name="ask")
        api_files = gr.File(file_count="multiple", visible=False)
        api_result = gr.JSON(visible=False)
        api_trigger = gr.Button(visible=False)
        api_trigger.click(handlers.upload_api, [api_files], [api_result], api_name="upload")
    return demo
