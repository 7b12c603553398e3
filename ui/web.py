"""The web UI: Gradio Blocks over app.pipeline (no decoding or retrieval logic lives here).

One Engine (models loaded once) and one HybridIndex serve every browser session and API client.
Per-session state (chat history, the statistics of the answer on screen) lives in Gradio's
component values, so nothing here is shared between sessions except the engine and the index.

No `from __future__ import annotations` in this module: gr.api reads the API endpoints' type
hints at runtime to describe them, and string annotations would break that.
"""

import argparse
import contextlib
import hashlib
import logging
import os
import re
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from app.config import Limits, Settings
from app.errors import user_message
from app.events import Done, Preparing, Progress, Sources, Status, Token
from app.pipeline import Engine
from app.progress import describe
from app.speedup import Speedup
from decoding.methods import METHODS
from decoding.settings import DecodingSettings
from decoding.stats import Stats
from retrieval.errors import RetrievalError
from retrieval.index import HybridIndex
from retrieval.readers import supported_extensions
from retrieval.types import Citation, DocumentInfo

logger = logging.getLogger("rapidqa.ui")

UNEXPECTED = "Something went wrong on the server; the details are in its log."
# Keeps a file name within the 255-byte limit of common filesystems, with room for a hash suffix.
MAX_NAME_BYTES = 150
# The chat shows a shorter excerpt than the citation holds, so the answer stays in view.
SOURCE_EXCERPT_CHARS = 180
_UNSAFE_NAME_CHARS = re.compile(r'[<>:"|?*]')
_MD_SPECIAL = re.compile(r"([\\`*_\[\]<>#|~])")


# ---------------------------------------------------------------------------------- uploads


def safe_upload_name(raw: str) -> str:
    """A file name that can only ever name a file directly inside the uploads folder.

    Strips directories (both separators), control and invisible formatting characters
    (e.g. right-to-left overrides), '..' runs, leading dots (no hidden files) and characters
    other systems reject; bounds the length in bytes while keeping the extension.
    """
    name = re.split(r"[\\/]", raw)[-1]
    name = "".join(ch for ch in name if ch.isprintable())
    name = _UNSAFE_NAME_CHARS.sub("_", name)
    name = re.sub(r"\.{2,}", ".", " ".join(name.split()))
    name = name.lstrip(". -")
    stem, dot, ext = name.rpartition(".")
    if not dot:
        stem, ext = name, ""
    ext = ext[:16]
    suffix = f".{ext}" if ext else ""
    while stem and len((stem + suffix).encode()) > MAX_NAME_BYTES:
        stem = stem[:-1]
    return f"{stem.rstrip(' .') or 'upload'}{suffix}"


@dataclass(frozen=True)
class UploadLine:
    """What happened to one uploaded file, in words for the page and the API."""

    name: str
    status: str  # "added" | "unchanged" | "error"
    message: str = ""

    def to_dict(self) -> dict[str, str]:
        return {"file": self.name, "status": self.status, "message": self.message}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _inside(directory: Path, path: Path) -> bool:
    return path.resolve().parent == directory.resolve()


def _private_copy(source: Path, uploads_dir: Path, suffix: str) -> Path:
    """Copy an upload to a fresh hidden file in uploads_dir: what gets indexed is exactly what
    gets kept, even if another session uploads a different file of the same name meanwhile."""
    handle, name = tempfile.mkstemp(dir=uploads_dir, prefix=".upload-", suffix=suffix)
    with os.fdopen(handle, "wb") as out, source.open("rb") as data:
        for block in iter(lambda: data.read(1 << 20), b""):
            out.write(block)
    return Path(name)


def _keep(copy: Path, uploads_dir: Path, name: str) -> None:
    """Move an indexed copy to its final name; a different file already there keeps its name
    and this one gets a content-hash suffix instead of overwriting it."""
    digest = _sha256(copy)
    final = uploads_dir / name
    if final.is_file() and not final.is_symlink() and _sha256(final) != digest:
        stem, suffix = os.path.splitext(name)
        final = uploads_dir / f"{stem}-{digest[:8]}{suffix}"
    if not _inside(uploads_dir, final):  # cannot happen with safe_upload_name; never write outside
        copy.unlink(missing_ok=True)
        return
    if final.is_file() and not final.is_symlink() and _sha256(final) == digest:
        copy.unlink(missing_ok=True)
    else:
        os.replace(copy, final)  # replaces a symlink itself rather than writing through it


def _strip_name(message: str, *names: str) -> str:
    """Ingest messages start with the file's name; the page already shows it in front."""
    for name in names:
        if message.startswith(f"{name}: "):
            return message[len(name) + 2:]
    return message


def ingest_uploads(index: HybridIndex, paths: Sequence[Path], uploads_dir: Path, limits: Limits) -> list[UploadLine]:
    """Copy uploads into uploads_dir under safe names and index them, one line per file.

    A bad file never stops the others and never changes the index: it is reported and its copy
    removed. Unexpected failures are logged with their traceback and reported without it.
    """
    if len(paths) > limits.max_files_per_upload:
        return [UploadLine(
            f"{len(paths)} files", "error",
            f"at most {limits.max_files_per_upload} files per upload; nothing was indexed, upload fewer at once.",
        )]
    uploads_dir.mkdir(parents=True, exist_ok=True)
    extensions = supported_extensions()
    lines = []
    for path in map(Path, paths):
        name = safe_upload_name(path.name)
        suffix = Path(name).suffix.lower()
        if suffix not in extensions:
            lines.append(UploadLine(name, "error", f"unsupported file type '{suffix or '(none)'}'; "
                                                   f"supported: {', '.join(extensions)}."))
            continue
        try:
            size = path.stat().st_size
        except OSError:
            lines.append(UploadLine(name, "error", "the upload could not be read; try again."))
            continue
        if size == 0:
            lines.append(UploadLine(name, "error", "the file is empty."))
            continue
        if size > limits.max_upload_bytes:
            lines.append(UploadLine(name, "error", f"the file is {size_text(size)}, over the "
                                                   f"{size_text(limits.max_upload_bytes)} limit."))
            continue
        lines.append(_ingest_one(index, path, name, suffix, uploads_dir))
    return lines


def _ingest_one(index: HybridIndex, path: Path, name: str, suffix: str, uploads_dir: Path) -> UploadLine:
    copy: Path | None = None
    private = name
    try:
        copy = _private_copy(path, uploads_dir, suffix)
        private = copy.name
        result = index.add_file(copy, source=name)
        _keep(copy, uploads_dir, name)
        copy = None
        message = _strip_name(result.message, private, name)
        if result.status == "added":
            detail = f"{result.n_chunks} chunk{'s' * (result.n_chunks != 1)}"
            return UploadLine(result.source, "added", f"{detail}; {message}" if message else detail)
        return UploadLine(result.source, result.status, message)
    except RetrievalError as error:
        return UploadLine(name, "error", _strip_name(str(error), private, name))
    except Exception:
        logger.exception("indexing upload %s failed", name)
        return UploadLine(name, "error", f"could not be indexed. {UNEXPECTED}")
    finally:
        if copy is not None:
            copy.unlink(missing_ok=True)


def upload_markdown(lines: Sequence[UploadLine]) -> str:
    marks = {"added": "✓ added", "unchanged": "✓ unchanged", "error": "✗ not indexed"}
    return "\n".join(
        f"- {marks.get(line.status, line.status)}: **{_md(line.name)}**"
        + (f" — {_md(line.message)}" if line.message else "")
        for line in lines
    )


# ----------------------------------------------------------------------------- formatting


def _md(text: str) -> str:
    """Document text and file names shown as written, never as markup."""
    return _MD_SPECIAL.sub(r"\\\1", text)


def documents_markdown(documents: Sequence[DocumentInfo]) -> str:
    if not documents:
        return "_No documents indexed yet: upload some above._"
    rows = "\n".join(
        f"| {_md(doc.source)} | {doc.n_pages} | {doc.n_chunks} | {doc.n_tokens:,} |" for doc in documents
    )
    total = sum(doc.n_tokens for doc in documents)
    return (f"| Document | Pages | Chunks | Tokens |\n|---|--:|--:|--:|\n{rows}\n\n"
            f"{len(documents)} document{'s' * (len(documents) != 1)}, {total:,} tokens of long context.")


def document_choices(documents: Sequence[DocumentInfo]) -> list[tuple[str, str]]:
    return [(doc.source, doc.doc_id) for doc in documents]


def sources_markdown(citations: Sequence[Citation]) -> str:
    if not citations:
        return ""
    items = "\n".join(
        f"{i}. **{_md(c.label())}** — {_md(_shorten(c.excerpt, SOURCE_EXCERPT_CHARS))}"
        for i, c in enumerate(citations, 1)
    )
    return f"**Sources**\n\n{items}"


def _shorten(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    cut = text[:limit].rsplit(" ", 1)[0] if " " in text[:limit] else text[:limit]
    return cut.rstrip(" .,;:…") + "…"


def size_text(n: int) -> str:
    for unit, scale in (("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}" if n % scale else f"{n // scale} {unit}"
    return f"{n} bytes"


def _number(value: float | None, fmt: str, none: str = "n/a") -> str:
    return format(value, fmt) if value is not None else none


def speedup_text(speedup: Speedup | None) -> str:
    if speedup is None:
        return "n/a"
    figure = f"{speedup.value:.2f}×" if speedup.value is not None else "n/a"
    return f"{figure} ({speedup.label})"


def stats_markdown(state: str, stats: Stats | None = None, speedup: Speedup | None = None,
                   lc_stats: Stats | None = None) -> str:
    """The statistics panel: one table, refreshed after every target pass."""
    if stats is None:
        return f"**{state}**"
    cached = f", {stats.prefix_cached_tokens:,} from the prefix cache" if stats.prefix_cached_tokens else ""
    drafter = f"{stats.draft_context_tokens:,}" if stats.draft_context_tokens else "none"
    rows = [
        ("Method", stats.method),
        ("Acceptance rate", _number(stats.acceptance_rate, ".1%", "n/a (nothing drafted)")),
        ("Decode speed", f"{_number(stats.decode_tokens_per_s, '.2f')} tokens/s"),
        ("Mean accepted length", f"{_number(stats.mean_accepted_length, '.2f')} tokens per target pass"),
        ("First token after", f"{stats.first_token_s:.2f} s"),
        ("Answer end to end", f"{stats.answer_s:.2f} s"),
        ("Prefill", f"{stats.prefill_s:.2f} s"),
        ("Decode", f"{stats.decode_s:.2f} s"),
        ("Tokens generated / drafted / accepted", f"{stats.generated} / {stats.drafted} / {stats.accepted}"),
        ("Context tokens (target / drafter)", f"{stats.context_tokens:,} / {drafter}{cached}"),
        ("Speedup over LC decoding", _md(speedup_text(speedup))),
    ]
    if lc_stats is not None:
        rows.append(("LC on the same input", f"{_number(lc_stats.decode_tokens_per_s, '.2f')} tokens/s, "
                                             f"prefill {lc_stats.prefill_s:.2f} s"))
    table = "\n".join(f"| {name} | {value} |" for name, value in rows)
    return f"**{state}**\n\n| Statistic | Value |\n|---|---|\n{table}"


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


@dataclass
class AnswerView:
    """One assistant message while it streams: status line, answer text, sources, error."""

    status: str = "Waiting for the model"
    text: str = ""
    citations: tuple[Citation, ...] = ()
    error: str | None = None
    finished: bool = False

    def markdown(self) -> str:
        parts = []
        if self.text:
            parts.append(self.text)
        if self.error:
            parts.append(f"⚠ {_md(self.error)}")
        elif not self.finished:
            parts.append(f"_{_md(self.status)}…_")
        if self.citations and not self.error:
            parts.append(sources_markdown(self.citations))
        return "\n\n".join(parts)


# ------------------------------------------------------------------------------------ app

_STATUS_LINE = re.compile(r"(?m)^_[^\n]*…_$")  # AnswerView's "working…" line


def _message_text(message: dict[str, Any]) -> str:
    """A chat message's text, whether Gradio hands it back as a string or as content parts."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content or [] if isinstance(part, dict))



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
        return documents_markdown(documents), gr.Dropdown(choices=document_choices(documents), value=None)

    def on_upload(files: list[str] | None) -> tuple[str, str, Any, None]:
        lines = ingest_uploads(index, [Path(f) for f in files or []], uploads_dir, limits)
        engine.prepare_in_background(index)
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
            return f"✗ **{_md(name)}** was not deleted: {_md(message or UNEXPECTED)}", *refresh_documents()
        if removed:
            engine.prepare_in_background(index)  # the documents' KV from the first changed one on
        text = f"✓ deleted **{_md(name)}**" if removed else f"**{_md(name)}** was already gone."
        return text, *refresh_documents()

    def on_ask(question: str, history: list[dict[str, Any]] | None, method: str, eta: float, gamma: float,
               temperature: float, max_new_tokens: float, compare: bool,
               budget: float) -> Iterator[tuple[Any, ...]]:
        """Stream one answer into the chat; statistics and plot follow each target pass."""
        history = list(history or [])
        if not (question or "").strip():
            gr.Warning("Type a question first.")
            yield gr.skip(), gr.skip(), gr.skip(), gr.skip()
            return
        view = AnswerView()
        history += [{"role": "user", "content": question}, {"role": "assistant", "content": view.markdown()}]
        stats: Stats | None = None
        yield history, "", stats_markdown("Retrieving passages…"), accepted_lengths_plot(None, int(gamma))
        started = time.perf_counter()
        try:
            decoding = decoding_for(settings, method, eta, gamma, temperature, max_new_tokens)
            retrieval = replace(settings.retrieval, budget_min_tokens=int(budget))
            # closing(): a cancelled or abandoned answer must release the engine's generate lock now.
            with contextlib.closing(engine.answer(question, index, decoding, bool(compare), retrieval)) as events:
                for event in events:
                    panel: Any = gr.skip()
                    plot: Any = gr.skip()
                    if isinstance(event, Status):
                        view.status = event.message
                        if stats is not None:  # e.g. the LC run of a comparison
                            panel = stats_markdown(f"{event.message}…", stats)
                    elif isinstance(event, Preparing):
                        view.status = describe(event)
                    elif isinstance(event, Sources):
                        view.citations = tuple(event.citations)
                    elif isinstance(event, Token):
                        view.text += event.text
                        view.status = "Generating"
                    elif isinstance(event, Progress):
                        stats = event.stats
                        panel = stats_markdown("Generating…", stats, event.speedup)
                        plot = accepted_lengths_plot(stats, decoding.gamma)
                    elif isinstance(event, Done):
                        stats = event.stats
                        view.text, view.citations, view.finished = event.answer, tuple(event.citations), True
                        elapsed = time.perf_counter() - started
                        reason = f", stopped by {stats.finish_reason}" if stats.finish_reason else ""
                        panel = stats_markdown(f"Answer complete in {elapsed:.1f} s{reason}", stats,
                                               event.speedup, event.lc_stats)
                        plot = accepted_lengths_plot(stats, decoding.gamma)
                    history[-1] = {"role": "assistant", "content": view.markdown()}
                    yield history, gr.skip(), panel, plot
        except Exception as error:
            view.error = _user_text(error)
            history[-1] = {"role": "assistant", "content": view.markdown()}
            yield history, gr.skip(), stats_markdown("No answer: see the message in the chat."), gr.skip()

    def on_stop(history: list[dict[str, Any]] | None, panel: str) -> tuple[Any, Any]:
        """After a cancel: the answer so far stays, its "working…" line says it was stopped."""
        history = list(history or [])
        if not history or history[-1].get("role") != "assistant":
            return gr.skip(), gr.skip()
        text = re.sub(_STATUS_LINE, "_Stopped._", _message_text(history[-1]), count=1)
        history[-1] = {"role": "assistant", "content": text}
        return history, re.sub(r"^\*\*[^\n]*…\*\*", "**Stopped.**", panel or "", count=1)

    def ask(question: str, method: str = default.method,
            max_new_tokens: int = default.max_new_tokens) -> tuple[str, dict[str, Any], list[dict[str, Any]]]:
        """Answer a question about the indexed documents. Returns (answer, statistics, sources)."""
        from app.cli import done_to_json  # the CLI's JSON layout, so API and `ask --json` agree

        decoding = replace(default, method=method, max_new_tokens=int(max_new_tokens))
        done: Done | None = None
        try:
            with contextlib.closing(engine.answer(question, index, decoding)) as events:
                done = next((e for e in events if isinstance(e, Done)), None)
        except Exception as error:
            raise gr.Error(_user_text(error), print_exception=False) from None
        if done is None:
            raise gr.Error(UNEXPECTED, print_exception=False)
        data = done_to_json(done)
        stats = {k: v for k, v in data["stats"].items() if k != "token_times"}
        stats |= {"speedup_vs_lc": data["speedup_vs_lc"], "speedup_basis": data["speedup_basis"]}
        return done.answer, stats, data["sources"]

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
                documents = gr.Markdown(documents_markdown(index.documents()), elem_id="documents")
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
                    clear = gr.ClearButton(value="Clear chat")
                    compare = gr.Checkbox(label="Compare with LC (measures the speedup side by side; slower)",
                                          value=False, elem_id="compare")
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
        clear.add([chatbot, stats_panel])

        files.upload(on_upload, [files], [upload_status, documents, doc_choice, files],
                     api_visibility="private")
        delete.click(on_delete, [doc_choice], [delete_status, documents, doc_choice], api_visibility="private")
        answering = gr.on(
            [ask_button.click, question.submit], on_ask,
            [question, chatbot, method, eta, gamma, temperature, max_new_tokens, compare, budget],
            [chatbot, question, stats_panel, plot], api_visibility="private", show_progress="minimal",
        )
        stop.click(on_stop, [chatbot, stats_panel], [chatbot, stats_panel], cancels=[answering],
                   api_visibility="private", queue=False)
        demo.load(refresh_documents, None, [documents, doc_choice], api_visibility="private")

        # API: `ask` takes plain values; `upload` goes through a (hidden) File component so that
        # Gradio checks the file paths a client sends are its own uploads, not server files.
        gr.api(ask, api_name="ask")
        api_files = gr.File(file_count="multiple", visible=False)
        api_result = gr.JSON(visible=False)
        api_trigger = gr.Button(visible=False)
        api_trigger.click(upload_api, [api_files], [api_result], api_name="upload")
    return demo


# ------------------------------------------------------------------------------ launching


def load_models(engine: Engine) -> None:
    """Load everything before the first visitor, so no request pays for it."""
    _ = engine.target, engine.drafter
    engine.embedder.embed_query("warm up")


def theme() -> gr.themes.Base:
    # System fonts: the default theme fetches Google Fonts, a request to a third party from a local app.
    return gr.themes.Soft(font=["ui-sans-serif", "system-ui", "sans-serif"],
                          font_mono=["ui-monospace", "monospace"])


def launch(demo: gr.Blocks, settings: Settings, *, prevent_thread_lock: bool = False) -> tuple[Any, str, str]:
    """Queue (answers wait their turn) and serve on settings.server; never through a share link."""
    server = settings.server
    return demo.queue(default_concurrency_limit=server.concurrency).launch(
        server_name=server.host, server_port=server.port, auth=server.auth, share=False,
        max_file_size=settings.limits.max_upload_bytes, prevent_thread_lock=prevent_thread_lock,
        theme=theme(), show_error=False, ssr_mode=False, mcp_server=False, pwa=False,
        enable_monitoring=False, quiet=prevent_thread_lock,
    )


def parse_auth(text: str) -> tuple[str, str]:
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise ValueError("auth must be USER:PASSWORD with both parts non-empty")
    return user, password


def serve_parser() -> argparse.ArgumentParser:
    from app.cli import add_decoding_options, add_model_options

    parser = argparse.ArgumentParser(
        prog="ask serve",
        description="Start the rapidqa web UI (Gradio). It listens on 127.0.0.1 only unless --host says otherwise.",
    )
    parser.add_argument("--host", help="address to listen on (default 127.0.0.1, this machine only; "
                        "0.0.0.0 exposes it to the network: set --auth then)")
    parser.add_argument("--port", type=int, help="port (default 7860)")
    parser.add_argument("--auth", metavar="USER:PASSWORD",
                        help="require this login (default: $RAPIDQA_AUTH if set, else no login)")
    parser.add_argument("--index", type=Path, metavar="DIR",
                        help="index directory (default $RAPIDQA_HOME/index)")
    parser.add_argument("--concurrency", type=int,
                        help="requests of one kind served at once (default 1; the engine still "
                        "generates one answer at a time, the others wait in the queue)")
    add_model_options(parser)
    add_decoding_options(parser)
    return parser


def settings_for_serve(args: argparse.Namespace) -> Settings:
    from app.cli import settings_from_args

    settings = settings_from_args(args)
    server = settings.server
    auth_text = args.auth if args.auth is not None else os.environ.get("RAPIDQA_AUTH") or None
    server = replace(
        server,
        host=args.host or server.host,
        port=args.port or server.port,
        auth=parse_auth(auth_text) if auth_text else None,
        concurrency=args.concurrency or server.concurrency,
    )
    return replace(settings, server=server)


def main(argv: Sequence[str] | None = None) -> int:
    for name, value in (("GRADIO_ANALYTICS_ENABLED", "False"), ("HF_HUB_OFFLINE", "1"),
                        ("TRANSFORMERS_OFFLINE", "1"), ("ANONYMIZED_TELEMETRY", "False")):
        os.environ.setdefault(name, value)
    parser = serve_parser()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        settings = settings_for_serve(args)
    except ValueError as error:
        parser.error(str(error))
    settings.decoding.validate()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if settings.server.host not in ("127.0.0.1", "localhost", "::1") and settings.server.auth is None:
        print(f"warning: listening on {settings.server.host} without --auth: anyone who can reach this "
              "port can read and change the documents.", file=sys.stderr)

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    engine = Engine(settings, log=log)
    log("loading models…")
    load_models(engine)
    demo = build_app(engine, args.index)
    launch(demo, settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
