"""A citation opened: the PDF page with the excerpt marked, the text around it for other formats."""

from __future__ import annotations

from pathlib import Path

import pytest

from retrieval.page_view import find_spans, fragments, kept_file, pdf_page_image, surrounding_text
from tests.ui_helpers import small_pdf

EXCERPT = "This manual is for R, version 4.2.2 <b>Patched</b> … Permission is granted to make and distribute"


def test_fragments_are_found_across_line_breaks_and_by_their_leading_words() -> None:
    text = ("Title\r\nThis manual is for R,\r\nversion 4.2.2 Patched (2022).\n"
            "Permission is granted to make\nand distribute")
    assert fragments(EXCERPT) == ["This manual is for R, version 4.2.2 <b>Patched</b>",
                                  "Permission is granted to make and distribute"]
    spans = find_spans(text, EXCERPT)
    assert [text[a:b] for a, b in spans] == ["This manual is for R,\r\nversion 4.2.2",
                                             "Permission is granted to make\nand distribute"]
    assert find_spans(text, "Nothing of this is there at all") == []
    assert find_spans(text, "manual is for nobody") == []  # a shorter run of its words would mark by chance
    assert [text[a:b] for a, b in find_spans(text, "is for")] == ["is for"]  # a short excerpt, whole


def yellow_pixels(image) -> int:  # type: ignore[no-untyped-def]
    return sum(1 for r, g, b in image.getdata() if r > 230 and 200 < g < 245 and b < 170)  # white under the mark


def test_pdf_page_is_rendered_with_the_excerpt_marked(tmp_path: Path) -> None:
    pdf = small_pdf(tmp_path / "manual.pdf")
    marked, found = pdf_page_image(pdf, 2, EXCERPT)
    plain, none = pdf_page_image(pdf, 2, "words that are on no page of this manual at all")
    assert (found, none) == (2, 0)
    assert marked.size == plain.size and marked.size[0] > 600
    assert yellow_pixels(marked) > 2000 and yellow_pixels(plain) == 0


def test_kept_file_is_the_indexed_version_only(tmp_path: Path) -> None:
    import hashlib

    pdf = small_pdf(tmp_path / "manual.pdf")
    digest = hashlib.sha256(pdf.read_bytes()).hexdigest()
    assert kept_file(tmp_path, "manual.pdf", digest) == pdf
    assert kept_file(tmp_path, "manual.pdf", "0" * 64) is None  # changed since it was indexed
    assert kept_file(tmp_path, "../manual.pdf", digest) is None
    assert kept_file(tmp_path, "other.pdf", digest) is None


def test_other_formats_show_the_cited_section_marked(tmp_path: Path) -> None:
    from retrieval.index import HybridIndex
    from retrieval.types import RetrievalSettings
    from tests.retrieval_fixtures import HashEmbedder, word_tokens
    from ui.render import marked_html

    notes = tmp_path / "notes.md"
    notes.write_text("# Install\n\nRun make first.\n\n# Versions\n\nThe manual is for R version 4.2.2 <b>.\n")
    with HybridIndex(tmp_path / "index", RetrievalSettings(), word_tokens, HashEmbedder()) as index:
        index.add_files([notes], progress=False)
        chunk = next(c for d in index.documents() for c in index.chunks(d.doc_id) if "4.2.2" in c.text)
        cited = "The manual is for R version 4.2.2 <b>."
        marked = surrounding_text(index, "notes.md", chunk.page, chunk.section, cited)
        assert marked is not None and [marked.text[a:b] for a, b in marked.spans] == [
            "The manual is for R version 4.2.2 <b>."]
        assert surrounding_text(index, "notes.md", chunk.page, chunk.section, "not in the notes at all, no") is None
        assert surrounding_text(index, "gone.md", None, None, "The manual is for R") is None
    shown = marked_html(marked.text, marked.spans)
    assert "<mark>The manual is for R version 4.2.2 &lt;b&gt;.</mark>" in shown


@pytest.mark.parametrize("spans", [[(0, 3)], [(0, 3), (1, 2)]])
def test_marked_html_escapes_and_skips_overlaps(spans: list[tuple[int, int]]) -> None:
    from ui.render import marked_html

    assert "<mark>a&lt;b</mark>&gt;" in marked_html("a<b>", spans)
