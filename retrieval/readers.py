"""Files -> pages: one reader per format, each returning text with its page or section.

Every failure a user can cause (wrong type, empty, too big, damaged, encrypted, scanned, binary)
becomes an IngestError with a one-line message naming the file; no reader lets a library
exception or a traceback through.
"""

from __future__ import annotations

import io
import re
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING

from bs4 import BeautifulSoup, Tag

from retrieval.errors import IngestError
from retrieval.types import Page

if TYPE_CHECKING:
    from docx.table import Table
    from pypdf import PdfReader

PAGE_SEPARATOR = "\n\n"  # how pages join into the document text; Page.char_start counts it

_HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$")
_FENCE = re.compile(r"^\s*(```|~~~)")
# Control characters other than tab, newline, carriage return and form feed: text that holds them
# after decoding is binary data or a wrong guess at the encoding.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0e-\x1f\x7f]")
# Table-of-contents dot leaders (". . . . ."): no content, many tokens in every context.
_DOT_LEADER = re.compile(r" ?\.(?: \.){3,}")
_HTML_DROP = ("script", "style", "noscript", "template", "svg", "canvas", "iframe", "head")
_HTML_BLOCKS = (
    "p", "div", "br", "li", "tr", "table", "pre", "blockquote", "section", "article",
    "header", "footer", "ul", "ol", "dd", "dt", "hr", "main", "nav", "aside", "figure", "form",
)
# Real pages nest a few dozen elements deep; thousands means a hostile file, on which the tree
# edits below would take minutes (each edit walks the ancestors).
_HTML_MAX_DEPTH = 512
# A .docx is a zip; a small one that unpacks to gigabytes is a zip bomb, not a document.
_DOCX_MAX_UNPACK_RATIO = 20
_MAX_NAME_CHARS = 200


@dataclass(frozen=True)
class ReadResult:
    """Pages plus notes the user should see (e.g. which fallback encoding was used)."""

    pages: list[Page]
    notes: tuple[str, ...] = field(default=())


def read_document(path: Path, max_bytes: int) -> list[Page]:
    """Read one file into pages; raise IngestError with a user-facing message when it cannot."""
    return read_document_with_notes(path, max_bytes).pages


def read_document_with_notes(path: Path, max_bytes: int) -> ReadResult:
    path = Path(path)
    reader = _READERS.get(path.suffix.lower())
    if reader is None:
        raise IngestError(
            f"{file_name(path)}: unsupported file type '{path.suffix or '(none)'}'; "
            f"supported: {', '.join(supported_extensions())}."
        )
    check_size(path, max_bytes)
    try:
        return reader(path)
    except IngestError:
        raise
    except RecursionError:
        raise IngestError(f"{file_name(path)}: the file is nested too deeply to read.") from None
    except MemoryError:
        raise IngestError(f"{file_name(path)}: the file is too large to read in memory.") from None


def file_name(path: Path) -> str:
    """How a file is named in messages: its display name (see display_name)."""
    return display_name(path.name)


def display_name(raw: str) -> str:
    """A file name safe to show and to put in a prompt header: last path component only, no
    control or invisible formatting characters (e.g. right-to-left overrides), bounded length.
    It is never used as a path: nothing is written under a document's name."""
    name = re.split(r"[\\/]", raw)[-1]
    name = "".join(ch for ch in name if ch.isprintable())
    name = " ".join(name.split())[:_MAX_NAME_CHARS]
    return "document" if name in ("", ".", "..") else name


def supported_extensions() -> tuple[str, ...]:
    return tuple(sorted(_READERS))


def check_size(path: Path, max_bytes: int) -> None:
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise IngestError(f"{file_name(path)}: cannot open the file ({exc.strerror or exc}).") from None
    if not path.is_file():
        raise IngestError(f"{file_name(path)}: not a regular file.")
    if size == 0:
        raise IngestError(f"{file_name(path)}: the file is empty.")
    if size > max_bytes:
        raise IngestError(f"{file_name(path)}: the file is {_bytes(size)}, over the {_bytes(max_bytes)} limit.")


def _bytes(n: int) -> str:
    if n < 10_000:
        return f"{n:,} bytes"
    return f"{n / 1e6:.1f} MB" if n >= 1_000_000 else f"{n / 1e3:.0f} kB"


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise IngestError(f"{file_name(path)}: cannot read the file ({exc.strerror or exc}).") from None


def pages_from_texts(texts: list[tuple[str, int | None, str | None]]) -> list[Page]:
    """(text, page, section) triples -> Pages whose char_start matches the joined document text."""
    pages: list[Page] = []
    offset = 0
    for text, page, section in texts:
        pages.append(Page(text=text, page=page, section=section, char_start=offset))
        offset += len(text) + len(PAGE_SEPARATOR)
    return pages


def document_text(pages: list[Page]) -> str:
    return PAGE_SEPARATOR.join(page.text for page in pages)


def _require_text(path: Path, pages: list[Page]) -> list[Page]:
    if not any(page.text.strip() for page in pages):
        raise IngestError(f"{file_name(path)}: the file contains no text.")
    return pages


# --- PDF ---------------------------------------------------------------------------------------


def _read_pdf(path: Path) -> ReadResult:
    import pypdf  # imported here: pypdf is slow to import and only PDFs need it

    data = _read_bytes(path)
    if b"%PDF-" not in data[:1024]:
        raise IngestError(f"{file_name(path)}: not a PDF file (no PDF header; is it another format renamed?).")
    try:
        reader = pypdf.PdfReader(io.BytesIO(data), strict=False)
        _unlock_pdf(path, reader)
        n_pages = len(reader.pages)
        texts = [(_clean_text(page.extract_text() or ""), number, None)
                 for number, page in enumerate(reader.pages, start=1)]
    except IngestError:
        raise
    except Exception as exc:  # pypdf raises many types on damaged files; all mean the same to a user
        raise IngestError(
            f"{file_name(path)}: the PDF is damaged or truncated and cannot be read ({_short(exc)})."
        ) from None
    if n_pages == 0:
        raise IngestError(f"{file_name(path)}: the PDF has no pages.")
    if not any(text.strip() for text, _, _ in texts):
        raise IngestError(f"{file_name(path)}: no extractable text (scanned?); run OCR on it first.")
    return ReadResult(pages_from_texts(texts))


def _unlock_pdf(path: Path, reader: PdfReader) -> None:
    """Open PDFs that are encrypted with an empty user password (common: owner-only restrictions)."""
    if not reader.is_encrypted:
        return
    try:
        unlocked = reader.decrypt("")
    except Exception as exc:  # e.g. AES without the optional 'cryptography' package
        message = f"{file_name(path)}: the PDF is encrypted and cannot be opened ({_short(exc)})."
        raise IngestError(message) from None
    if not unlocked:
        raise IngestError(
            f"{file_name(path)}: the PDF is password-protected; remove the password and add it again."
        )


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:120]


def _clean_text(text: str) -> str:
    return _DOT_LEADER.sub(" …", _CONTROL.sub("", text))


# --- plain text and Markdown -------------------------------------------------------------------


def _decode_text(path: Path, data: bytes) -> tuple[str, tuple[str, ...]]:
    """UTF-8 first; then a UTF-16 BOM; then Windows-1252 only when the result is clean text."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        try:
            return data.decode("utf-16"), ("decoded as UTF-16",)
        except UnicodeDecodeError:
            pass
    if b"\x00" in data:
        raise IngestError(f"{file_name(path)}: the file holds binary data, not text.")
    try:
        return data.decode("utf-8-sig"), ()  # utf-8-sig reads plain UTF-8 too, minus a leading BOM
    except UnicodeDecodeError as exc:
        bad = exc.start
    text = _try_cp1252(data)
    if text is None:
        raise IngestError(
            f"{file_name(path)}: the text is not UTF-8 (invalid byte 0x{data[bad]:02x} at offset {bad}) "
            "and no clean fallback encoding fits; save it as UTF-8 and add it again."
        )
    return text, ("not UTF-8: decoded as Windows-1252 (cp1252)",)


def _try_cp1252(data: bytes) -> str | None:
    try:
        text = data.decode("cp1252")
    except UnicodeDecodeError:  # bytes cp1252 leaves undefined (0x81, 0x8d, ...): not cp1252
        return None
    if _CONTROL.search(text):
        return None
    # Text in Latin-script languages is mostly ASCII; a high share of accented letters means the
    # bytes are another legacy encoding (Shift-JIS, KOI8-R, ...) and cp1252 would give mojibake.
    non_ascii = sum(1 for ch in text if ord(ch) > 127)
    return text if non_ascii <= 0.3 * len(text) else None


def _read_txt(path: Path) -> ReadResult:
    text, notes = _decode_text(path, _read_bytes(path))
    text = _normalise_newlines(text)
    return ReadResult(_require_text(path, pages_from_texts([(text, None, None)])), notes)


def _read_markdown(path: Path) -> ReadResult:
    text, notes = _decode_text(path, _read_bytes(path))
    sections = markdown_sections(_normalise_newlines(text))
    return ReadResult(_require_text(path, pages_from_texts(sections)), notes)


def markdown_sections(text: str) -> list[tuple[str, int | None, str | None]]:
    """Split at ATX headings (outside code fences); each section keeps its heading line."""
    sections: list[tuple[str, int | None, str | None]] = []
    lines: list[str] = []
    title: str | None = None
    in_fence = False
    for line in text.split("\n"):
        if _FENCE.match(line):
            in_fence = not in_fence
        heading = None if in_fence else _HEADING.match(line)
        if heading:
            _close_section(sections, lines, title)
            lines, title = [], heading.group(2).strip()
        lines.append(line)
    _close_section(sections, lines, title)
    return sections


def _close_section(sections: list[tuple[str, int | None, str | None]], lines: list[str],
                   title: str | None) -> None:
    body = "\n".join(lines).strip()
    if body:
        sections.append((body, None, title))


def _normalise_newlines(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


# --- HTML --------------------------------------------------------------------------------------


def _read_html(path: Path) -> ReadResult:
    data = _read_bytes(path)
    if b"\x00" in data[:4096] and not data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise IngestError(f"{file_name(path)}: the file holds binary data, not HTML.")
    # html.parser builds the tree without recursion, so even hostile nesting parses, in seconds.
    soup = BeautifulSoup(data, "html.parser")
    if _nesting_exceeds(soup, _HTML_MAX_DEPTH):
        raise IngestError(f"{file_name(path)}: the HTML is nested too deeply (over {_HTML_MAX_DEPTH} levels).")
    for tag in soup(list(_HTML_DROP)):
        tag.decompose()
    # Headings become Markdown heading lines so the Markdown sectioniser names the sections.
    for heading in soup.find_all(["h1", "h2", "h3", "h4", "h5", "h6"]):
        level = int(heading.name[1])
        heading.replace_with(f"\n\n{'#' * level} {heading.get_text(' ', strip=True)}\n\n")
    for block in soup.find_all(list(_HTML_BLOCKS)):
        block.insert_after("\n")
    text = _tidy_lines(soup.get_text())
    return ReadResult(_require_text(path, pages_from_texts(markdown_sections(text))))


def _nesting_exceeds(soup: BeautifulSoup, limit: int) -> bool:
    """Iterative depth check: one pass in document order, each element one deeper than its parent."""
    depth = {id(soup): 0}
    for element in soup.descendants:
        if isinstance(element, Tag):
            depth[id(element)] = depth[id(element.parent)] + 1
            if depth[id(element)] > limit:
                return True
    return False


def _tidy_lines(text: str) -> str:
    """Collapse runs of spaces inside lines and of blank lines between them."""
    lines = [" ".join(line.split()) for line in _normalise_newlines(text).split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


# --- DOCX --------------------------------------------------------------------------------------


def _read_docx(path: Path) -> ReadResult:
    _check_zip(path)
    import docx  # python-docx
    from docx.table import Table

    try:
        document = docx.Document(str(path))
        sections: list[tuple[str, int | None, str | None]] = []
        lines: list[str] = []
        title: str | None = None
        for block in document.iter_inner_content():
            if isinstance(block, Table):
                lines.extend(_table_lines(block))
                continue
            style = (block.style.name if block.style is not None else "") or ""
            if style.startswith(("Heading", "Title")) and block.text.strip():
                _close_section(sections, lines, title)
                lines, title = [], block.text.strip()
            lines.append(block.text)
        _close_section(sections, lines, title)
    except IngestError:
        raise
    except Exception as exc:  # a zip that is not a Word document, or a damaged one
        raise IngestError(f"{file_name(path)}: not a readable Word document ({_short(exc)}).") from None
    return ReadResult(_require_text(path, pages_from_texts(sections)))


def _check_zip(path: Path) -> None:
    try:
        with zipfile.ZipFile(path) as archive:
            unpacked = sum(info.file_size for info in archive.infolist())
    except (zipfile.BadZipFile, OSError):
        raise IngestError(f"{file_name(path)}: not a valid .docx file (it is not a zip archive).") from None
    if unpacked > _DOCX_MAX_UNPACK_RATIO * max(path.stat().st_size, 1_000_000):
        raise IngestError(f"{file_name(path)}: the .docx unpacks to {unpacked / 1e6:.0f} MB; refusing it.")


def _table_lines(table: Table) -> list[str]:
    lines = []
    for row in table.rows:
        cells = [" ".join(cell.text.split()) for cell in row.cells]
        if any(cells):
            lines.append(" | ".join(cells))
    return lines


_READERS: Mapping[str, Callable[[Path], ReadResult]] = MappingProxyType({
    ".pdf": _read_pdf,
    ".txt": _read_txt,
    ".md": _read_markdown,
    ".markdown": _read_markdown,
    ".html": _read_html,
    ".htm": _read_html,
    ".docx": _read_docx,
})
