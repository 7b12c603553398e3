"""Small real documents cut from the shipped sample PDF, so end-to-end tests prefill quickly."""

from __future__ import annotations

from pathlib import Path

import pypdf

SAMPLE_PDF = Path(__file__).resolve().parent.parent / "data" / "R-data.pdf"


def pdf_excerpt(pages: list[int], out: Path, source: Path = SAMPLE_PDF) -> Path:
    """Write the given 1-based pages of `source` into a new PDF."""
    reader = pypdf.PdfReader(source)
    writer = pypdf.PdfWriter()
    for page in pages:
        writer.add_page(reader.pages[page - 1])
    with out.open("wb") as handle:
        writer.write(handle)
    return out


def page_text(pages: list[int], source: Path = SAMPLE_PDF) -> str:
    reader = pypdf.PdfReader(source)
    return "\n\n".join(reader.pages[p - 1].extract_text() for p in pages)
