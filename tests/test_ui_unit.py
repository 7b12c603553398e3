"""The UI's own logic, without a server or models: upload names and storage, limits, formatting."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from app.config import Limits
from app.speedup import Speedup
from decoding.stats import Stats
from retrieval.errors import IngestError
from retrieval.types import Citation, DocumentInfo, IngestResult, PartEvidence, Reading
from ui.render import AnswerView, documents_markdown, size_text, sources_markdown, stats_markdown, upload_markdown
from ui.upload_line import UploadLine
from ui.uploads import MAX_NAME_BYTES, ingest_uploads, safe_upload_name

NASTY_NAMES = [
    "../../etc/passwd.txt", "..\\..\\windows\\win.ini.txt", "/abs/path/report.pdf", "a/b/../c.pdf",
    ".hidden.pdf", "..", ".", "...", "", " ", "..pdf", "a..b.pdf", "\u202efdp.exe.txt", "nul\x00byte.pdf",
    "tab\tand\nnewline.md", "what?.pdf", "-rf.txt", "é" * 300 + ".pdf", "x" * 400, "name.with.many.dots.html",
]


@pytest.mark.parametrize("raw", NASTY_NAMES)
def test_safe_names_stay_inside_the_uploads_folder(raw: str, tmp_path: Path) -> None:
    name = safe_upload_name(raw)
    assert name and not name.startswith((".", "-")) and ".." not in name
    assert "/" not in name and "\\" not in name and all(ch.isprintable() for ch in name)
    assert len(name.encode()) <= MAX_NAME_BYTES
    assert (tmp_path / name).resolve().parent == tmp_path.resolve()


@pytest.mark.parametrize(("raw", "expected"), [
    ("../../etc/passwd.txt", "passwd.txt"),
    ("C:\\Users\\me\\Report 2024.pdf", "Report 2024.pdf"),
    ("résumé.docx", "résumé.docx"),
    ("\u202efdp.exe.txt", "fdp.exe.txt"),
    (".bashrc.md", "bashrc.md"),
    ("a..b.pdf", "a.b.pdf"),
    ("what?.pdf", "what_.pdf"),
    ("", "upload"),
    ("...", "upload"),
    (".pdf", "pdf"),
])
def test_safe_name_examples(raw: str, expected: str) -> None:
    assert safe_upload_name(raw) == expected


def test_long_names_keep_their_extension() -> None:
    name = safe_upload_name("é" * 300 + ".pdf")
    assert name.endswith(".pdf") and len(name.encode()) <= MAX_NAME_BYTES


@dataclass
class FakeIndex:
    """Records what the UI asks of the index; fails the way HybridIndex does when told to."""

    fail: dict[str, str | Exception] = field(default_factory=dict)  # a str becomes an IngestError
    calls: list[tuple[Path, str, bytes]] = field(default_factory=list)

    def add_file(self, path: Path, source: str | None = None) -> IngestResult:
        assert source is not None
        self.calls.append((path, source, path.read_bytes()))
        failure = self.fail.get(source)
        if isinstance(failure, str):
            raise IngestError(f"{path.name}: {failure}")  # like the readers: named by the file read
        if failure is not None:
            raise failure
        if any(s == source and d == path.read_bytes() for _, s, d in self.calls[:-1]):
            return IngestResult(path, source, "unchanged", "already indexed", "id", 1)
        return IngestResult(path, source, "added", "", "id", 2)


def upload(tmp_path: Path, name: str, data: bytes) -> Path:
    # Gradio hands the handler a file in its own cache folder, named as the user's file was.
    path = tmp_path / "gradio" / str(len(list(tmp_path.glob("gradio/*")))) / name
    path.parent.mkdir(parents=True)
    path.write_bytes(data)
    return path


def stored(uploads: Path) -> list[str]:
    return sorted(p.name for p in uploads.iterdir()) if uploads.exists() else []


def test_good_upload_is_copied_under_its_safe_name_then_indexed(tmp_path: Path) -> None:
    index, uploads = FakeIndex(), tmp_path / "uploads"
    lines = ingest_uploads(index, [upload(tmp_path, "notes.md", b"# Notes\n")], uploads, Limits())
    assert [(line.name, line.status, line.message) for line in lines] == [("notes.md", "added", "2 chunks")]
    assert index.calls[0][0].parent == uploads and index.calls[0][1] == "notes.md"
    assert stored(uploads) == ["notes.md"] and (uploads / "notes.md").read_bytes() == b"# Notes\n"


def test_limits_and_unusable_files_are_refused_before_copying(tmp_path: Path) -> None:
    index, uploads = FakeIndex(), tmp_path / "uploads"
    limits = Limits(max_upload_bytes=10, max_files_per_upload=4)
    too_many = [upload(tmp_path, f"n{i}.txt", b"x") for i in range(5)]
    [line] = ingest_uploads(index, too_many, uploads, limits)
    assert line.status == "error" and "at most 4 files" in line.message and "nothing was indexed" in line.message

    files = [upload(tmp_path, "big.txt", b"x" * 11), upload(tmp_path, "tool.exe", b"MZ"),
             upload(tmp_path, "empty.txt", b""), upload(tmp_path, "noext", b"text")]
    lines = ingest_uploads(index, files, uploads, limits)
    assert [line.status for line in lines] == ["error"] * 4
    assert lines[0].message == "the file is 11 bytes, over the 10 bytes limit."
    assert lines[1].message.startswith("unsupported file type '.exe'; supported: ")
    assert lines[2].message == "the file is empty."
    assert lines[3].message.startswith("unsupported file type '(none)'")
    assert index.calls == [] and stored(uploads) == []


def test_a_file_the_index_rejects_leaves_nothing_behind(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    index = FakeIndex(fail={"bad.pdf": "the PDF is damaged.", "odd.txt": KeyError("internal")})
    uploads = tmp_path / "uploads"
    files = [upload(tmp_path, "bad.pdf", b"%PDF-1"), upload(tmp_path, "odd.txt", b"text"),
             upload(tmp_path, "good.txt", b"text")]
    with caplog.at_level(logging.ERROR, logger="rapidqa.ui"):
        lines = ingest_uploads(index, files, uploads, Limits())
    assert [line.status for line in lines] == ["error", "error", "added"]
    # The index names the private copy it read; the page names the user's file, once.
    assert (lines[0].name, lines[0].message) == ("bad.pdf", "the PDF is damaged.")
    assert "internal" not in lines[1].message and "server" in lines[1].message
    assert "indexing upload odd.txt failed" in caplog.text  # the traceback goes to the log
    assert stored(uploads) == ["good.txt"]  # no copy of a rejected file, no leftover temp file


def test_same_name_new_content_is_kept_beside_the_old_file(tmp_path: Path) -> None:
    index, uploads = FakeIndex(), tmp_path / "uploads"
    ingest_uploads(index, [upload(tmp_path, "a.txt", b"one")], uploads, Limits())
    ingest_uploads(index, [upload(tmp_path, "a.txt", b"one")], uploads, Limits())
    assert stored(uploads) == ["a.txt"]
    [line] = ingest_uploads(index, [upload(tmp_path, "a.txt", b"two")], uploads, Limits())
    assert line.status == "added"
    names = stored(uploads)
    assert len(names) == 2 and "a.txt" in names and (uploads / "a.txt").read_bytes() == b"one"
    other = next(n for n in names if n != "a.txt")
    assert other.startswith("a-") and other.endswith(".txt") and (uploads / other).read_bytes() == b"two"


def test_unchanged_uploads_say_so_without_repeating_the_name(tmp_path: Path) -> None:
    index, uploads = FakeIndex(), tmp_path / "uploads"
    ingest_uploads(index, [upload(tmp_path, "a.txt", b"one")], uploads, Limits())
    [line] = ingest_uploads(index, [upload(tmp_path, "a.txt", b"one")], uploads, Limits())
    assert (line.status, line.message) == ("unchanged", "already indexed")


def test_upload_lines_escape_markup() -> None:

    text = upload_markdown([UploadLine("a*b*.txt", "error", "bad <img src=x>")])
    assert "a\\*b\\*.txt" in text and "\\<img src=x\\>" in text


def test_stats_panel_never_invents_a_speedup() -> None:
    stats = Stats(method="rapid", generated=8, drafted=10, accepted=6, target_passes=3, prefill_s=1.5, decode_s=2.0,
                  context_tokens=600, draft_context_tokens=300, accepted_lengths=[3, 3, 2])
    text = stats_markdown("Generating…", stats, Speedup(None, "no LC run measured yet"))
    assert "| Acceptance rate | 60.0% |" in text
    assert "| Decode speed | 3.50 tokens/s |" in text  # (8 - 1) tokens after the first, in 2 s
    assert "| Mean accepted length | 2.67 tokens per target pass |" in text
    assert "| Tokens generated / drafted / accepted | 8 / 10 / 6 |" in text
    assert "| Speedup over LC decoding | n/a (no LC run measured yet) |" in text
    measured = stats_markdown("done", stats, Speedup(2.0, "measured side by side on this input"))
    assert "2.00× (measured side by side on this input)" in measured
    lc = stats_markdown("done", Stats(method="lc"), Speedup(1.0, "LC itself"))
    assert "n/a (nothing drafted)" in lc and "| Decode speed | n/a tokens/s |" in lc


def test_sources_show_document_page_and_escaped_excerpt() -> None:
    text = sources_markdown([Citation("guide.pdf", 4, None, "Use <script>alert(1)</script> *here*", 0.1),
                             Citation("notes.md", None, "Setup", "x" * 400, 0.05)])
    assert "1. **guide.pdf, p. 4** — Use \\<script\\>alert(1)\\</script\\> \\*here\\*" in text
    assert "2. **notes.md, Setup** — " in text and text.endswith("…") and "x" * 400 not in text
    assert sources_markdown([]) == ""


def test_sources_say_which_part_of_a_large_corpus_the_model_read() -> None:
    part = "pages 22-80 of R-intro.pdf"
    reading = Reading(2, 3, part, (PartEvidence(1, 1, 1 / 3, "R-data.pdf"), PartEvidence(2, 2, 1.5, part)), 3)
    text = sources_markdown([Citation("R-intro.pdf", 30, None, "a", 0.1), Citation("R-data.pdf", 3, None, "b", 0.1,
                                                                                   read=False)], reading)
    assert text.startswith("**Sources**\n\n_The model read pages 22-80 of R-intro.pdf (part 2 of 3); 1 of 3 "
                           "retrieved passages, weaker ones, lie in parts not read (part 1: R-data.pdf)._")
    # The best-ranked passage lies in the part not read: a close call, said so.
    close = Reading(2, 3, part, (PartEvidence(1, 1, 1.0, "R-data.pdf"), PartEvidence(2, 2, 0.5 + 1 / 3, part)), 3)
    assert close.split and "; the evidence is split: 1 of 3 retrieved passages, nearly as strong as those read, " \
        "lie in parts not read (part 1: R-data.pdf)" in close.note()
    assert "1. **R-intro.pdf, p. 30** — a" in text and "2. **R-data.pdf, p. 3** _(not read by the model)_ — b" in text
    view = AnswerView(text="x", citations=(Citation("R-intro.pdf", 30, None, "a", 0.1),), reading=reading,
                      finished=True)
    assert "_The model read pages 22-80 of R-intro.pdf" in view.markdown()


def test_the_document_list_names_the_parts_of_a_large_corpus() -> None:
    docs = [DocumentInfo("a", "R-data.pdf", "0", 40, 12, 20_614),
            DocumentInfo("b", "R-intro.pdf", "1", 90, 105, 57_522)]
    assert "parts" not in documents_markdown(docs)
    text = documents_markdown(docs, ["R-data.pdf, pages 1-14 of R-intro.pdf", "pages 15-105 of R-intro.pdf"])
    assert text.endswith("for each question it reads one of 2 parts, the one holding most of the retrieved passages "
                         "(part 1: R-data.pdf, pages 1-14 of R-intro.pdf; part 2: pages 15-105 of R-intro.pdf).")


def test_answer_view_shows_status_then_answer_then_error() -> None:
    view = AnswerView(status="Retrieving passages")
    assert view.markdown() == "_Retrieving passages…_"
    view.text, view.citations = "R 4.2.2", (Citation("m.pdf", 2, None, "R 4.2.2", 0.1),)
    assert view.markdown().startswith("R 4.2.2\n\n_Retrieving passages…_") and "m.pdf, p. 2" in view.markdown()
    view.finished = True
    assert "…_" not in view.markdown()
    view.error = "The question is empty."
    assert "⚠ The question is empty." in view.markdown() and "Sources" not in view.markdown()


def test_sizes_read_naturally() -> None:
    assert [size_text(n) for n in (10, 2048, 3 * 2**20, 50 * 2**20 + 1)] == [
        "10 bytes", "2 KiB", "3 MiB", "50.0 MiB"]


def test_a_stopped_answer_keeps_its_text_and_says_so() -> None:
    view = AnswerView(status="Generating", text="R 4.2")
    assert view.working
    view.stopped = True
    assert view.markdown() == "R 4.2\n\n_Stopped._" and not view.working
