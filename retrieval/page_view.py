"""A cited page as the user can check it: the PDF page rendered with the excerpt marked, or, for other
formats (or a PDF the server no longer holds), the text around the excerpt with the excerpt marked.

An excerpt is the cited chunk's best sentences joined by "…" (retrieval.context.best_sentences), and
PDF text has line breaks where the excerpt has spaces: each fragment is found with whitespace
collapsed, and a fragment not found whole is looked for by its longest leading run of words.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from retrieval.index import HybridIndex

RENDER_SCALE = 1.5  # 108 dpi: readable in the page panel without a large image
MIN_WORDS = 4  # a shorter run of words would mark chance matches
MARK = (255, 214, 0, 110)  # translucent yellow


@dataclass(frozen=True)
class MarkedText:
    """Text with the character spans to mark."""

    text: str
    spans: tuple[tuple[int, int], ...]


def fragments(excerpt: str) -> list[str]:
    """The excerpt's runs of consecutive document text (split where "…" skipped some)."""
    return [part.strip() for part in excerpt.split("…") if len(part.strip().split()) >= 1]


def find_spans(text: str, excerpt: str) -> list[tuple[int, int]]:
    """Where each fragment of the excerpt lies in `text` (character spans), whitespace aside."""
    flat, where = _collapsed(text)
    spans = []
    for fragment in fragments(excerpt):
        words = fragment.split()
        for size in range(len(words), min(MIN_WORDS, len(words)) - 1, -1):
            start = flat.find(" ".join(words[:size]))
            if start >= 0:
                end = start + len(" ".join(words[:size]))
                spans.append((where[start], where[end - 1] + 1))
                break
    return sorted(spans)


def _collapsed(text: str) -> tuple[str, list[int]]:
    """The text with every run of whitespace one space, and where each of its characters came from."""
    out, where = [], []
    for match in re.finditer(r"\S+", text):
        if out:
            out.append(" ")
            where.append(match.start() - 1)
        out.append(match.group())
        where.extend(range(match.start(), match.end()))
    return "".join(out), where


def kept_file(uploads_dir: Path, source: str, sha256: str) -> Path | None:
    """The server's copy of an indexed document, when it is exactly the indexed version."""
    path = uploads_dir / source
    if not path.is_file() or Path(source).name != source:
        return None
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return path if digest == sha256 else None


def pdf_page_image(path: Path, page: int, excerpt: str) -> tuple[object, int]:
    """The page rendered (a PIL image) with the excerpt's fragments marked; and how many were found."""
    import pypdfium2 as pdfium
    from PIL import Image, ImageDraw

    document = pdfium.PdfDocument(str(path))
    try:
        sheet = document[page - 1]
        textpage = sheet.get_textpage()
        text = textpage.get_text_range(0, textpage.count_chars())
        spans = find_spans(text, excerpt)
        height = sheet.get_height()
        image = sheet.render(scale=RENDER_SCALE).to_pil().convert("RGBA")
        overlay = Image.new("RGBA", image.size, (0, 0, 0, 0))
        draw = ImageDraw.Draw(overlay)
        for start, end in spans:
            for i in range(textpage.count_rects(start, end - start)):
                left, bottom, right, top = textpage.get_rect(i)
                draw.rectangle([left * RENDER_SCALE, (height - top) * RENDER_SCALE,
                                right * RENDER_SCALE, (height - bottom) * RENDER_SCALE], fill=MARK)
        return Image.alpha_composite(image, overlay).convert("RGB"), len(spans)
    finally:
        document.close()


def surrounding_text(index: HybridIndex, source: str, page: int | None, section: str | None,
                     excerpt: str) -> MarkedText | None:
    """The cited chunk's text (its section of the document) with the excerpt marked; None if no chunk holds it."""
    document = next((d for d in index.documents() if d.source == source), None)
    if document is None:
        return None
    chunks = index.chunks(document.doc_id)
    cited = [c for c in chunks if (page is None or c.page == page) and (section is None or c.section == section)]
    for chunk in sorted(cited, key=lambda c: -len(find_spans(c.text, excerpt))):
        spans = find_spans(chunk.text, excerpt)
        if spans:
            return MarkedText(chunk.text, tuple(spans))
    return None
