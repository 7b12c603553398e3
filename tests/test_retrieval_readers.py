"""Readers and chunking: real and generated files in, pages and chunks with provenance out."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from retrieval.chunking import chunk_pages
from retrieval.errors import IngestError
from retrieval.readers import PAGE_SEPARATOR, document_text, read_document, read_document_with_notes
from retrieval.types import Page
from tests.retrieval_fixtures import (
    R_DATA,
    R_FAQ,
    docx_bytes,
    encrypted_pdf,
    hostile_files,
    text_pdf,
    word_tokens,
    write,
)

MB = 1_000_000


@pytest.fixture(scope="module")
def r_data() -> list[Page]:
    return read_document(R_DATA, 50 * MB)


def test_real_pdfs_keep_every_page_number(r_data: list[Page]) -> None:
    pages = r_data
    assert [p.page for p in pages] == list(range(1, 42))
    assert pages[0].text.startswith("R Data Import/Export")
    assert "read.table" in pages[11].text  # chapter 2, printed page 8
    faq = read_document(R_FAQ, 50 * MB)
    assert len(faq) == 52
    assert "GNU General Public License" in faq[4].text


def test_char_start_indexes_the_joined_document_text(r_data: list[Page]) -> None:
    pages = r_data
    text = document_text(pages)
    for page in pages:
        assert text[page.char_start : page.char_start + len(page.text)] == page.text
    assert text == PAGE_SEPARATOR.join(p.text for p in pages)


def test_table_of_contents_dot_leaders_are_collapsed() -> None:
    toc = read_document(R_FAQ, 50 * MB)[1].text
    assert ". . . ." not in toc
    assert "1.1 Legalese … 1" in toc


def test_generated_pdf(tmp_path: Path) -> None:
    path = write(tmp_path / "two.pdf", text_pdf(["Llamas graze at dawn", "Zebras (striped) rest"]))
    pages = read_document(path, MB)
    assert [(p.text, p.page) for p in pages] == [("Llamas graze at dawn", 1), ("Zebras (striped) rest", 2)]


def test_pdf_encrypted_with_empty_user_password_opens(tmp_path: Path) -> None:
    path = write(tmp_path / "restricted.pdf", encrypted_pdf(user_password=""))
    assert read_document(path, MB)[0].text == "Secret quarterly figures"


def test_txt_utf8_bom_and_newlines(tmp_path: Path) -> None:
    path = write(tmp_path / "notes.txt", "\ufeffFirst line\r\nSecond line – ünïcode\r\n".encode())
    result = read_document_with_notes(path, MB)
    assert result.pages[0].text == "First line\nSecond line – ünïcode\n"
    assert result.notes == ()


def test_txt_clean_cp1252_is_accepted_and_says_so(tmp_path: Path) -> None:
    path = write(tmp_path / "legacy.txt", "Café prices “rose” by 5 €".encode("cp1252"))
    result = read_document_with_notes(path, MB)
    assert result.pages[0].text == "Café prices “rose” by 5 €"
    assert any("cp1252" in note for note in result.notes)


def test_txt_utf16_with_bom(tmp_path: Path) -> None:
    path = write(tmp_path / "windows.txt", "Unicode from Notepad".encode("utf-16"))
    assert read_document(path, MB)[0].text == "Unicode from Notepad"


def test_markdown_sections_from_headings_not_code(tmp_path: Path) -> None:
    text = "Preface line.\n\n# Install\nRun the installer.\n```\n# not a heading\n```\n## Usage\nCall it.\n"
    pages = read_document(write(tmp_path / "guide.md", text), MB)
    assert [(p.section, p.page) for p in pages] == [(None, None), ("Install", None), ("Usage", None)]
    assert "# not a heading" in pages[1].text
    assert pages[2].text == "## Usage\nCall it."


def test_html_text_only_with_sections(tmp_path: Path) -> None:
    html = (
        "<html><head><title>T</title><style>p {color: red}</style></head><body>"
        "<script>alert('x')</script><h1>Intro</h1><p>Hello <b>bold</b> world.</p>"
        "<h2>Next</h2><ul><li>one</li><li>two</li></ul><noscript>enable js</noscript></body></html>"
    )
    pages = read_document(write(tmp_path / "page.html", html), MB)
    text = document_text(pages)
    assert "alert" not in text and "color" not in text and "enable js" not in text
    assert [p.section for p in pages] == ["Intro", "Next"]
    assert "Hello bold world." in pages[0].text
    assert "one\ntwo" in pages[1].text


def test_deeply_nested_html_is_refused_quickly(tmp_path: Path) -> None:
    depth = 50_000
    path = write(tmp_path / "deep.htm", "<div>" * depth + "buried treasure" + "</div>" * depth)
    started = time.monotonic()
    with pytest.raises(IngestError, match=r"deep\.htm: the HTML is nested too deeply"):
        read_document(path, 10 * MB)
    assert time.monotonic() - started < 30


def test_moderately_nested_html_is_read(tmp_path: Path) -> None:
    path = write(tmp_path / "nested.html", "<div>" * 300 + "<p>still found</p>" + "</div>" * 300)
    assert "still found" in document_text(read_document(path, MB))


def test_docx_headings_become_sections_and_tables_are_kept(tmp_path: Path) -> None:
    data = docx_bytes(
        [("Summary", ["Revenue grew.", "Costs fell."]), ("Risks", ["Supply chain delays."])],
        table=[["Region", "Sales"], ["North", "42"]],
    )
    pages = read_document(write(tmp_path / "report.docx", data), MB)
    assert [p.section for p in pages] == ["Summary", "Risks"]
    assert "Revenue grew." in pages[0].text
    assert "Region | Sales\nNorth | 42" in pages[1].text


@pytest.mark.parametrize(
    "case",
    ["unsupported", "empty", "empty_pdf", "encrypted", "truncated", "binary_pdf", "scanned", "zero_pages",
     "not_utf8", "binary_txt", "docx_not_zip", "docx_bad_zip"],
)
def test_hostile_inputs_raise_clear_one_line_errors(tmp_path: Path, case: str) -> None:
    path, expected = hostile_files(tmp_path)[case]
    with pytest.raises(IngestError) as caught:
        read_document(path, 50 * MB)
    message = str(caught.value)
    assert expected in message
    assert message.startswith(path.name)
    assert "\n" not in message and "Traceback" not in message


def test_file_over_the_size_limit(tmp_path: Path) -> None:
    path = write(tmp_path / "big.txt", "x" * 5000)
    with pytest.raises(IngestError, match=r"big.txt: the file is 5,000 bytes, over the 1,000 bytes limit"):
        read_document(path, 1000)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(IngestError, match="cannot open"):
        read_document(tmp_path / "gone.pdf", MB)


# --- chunking ------------------------------------------------------------------------------------


def test_chunks_stay_on_their_page_and_respect_the_size(r_data: list[Page]) -> None:
    pages = r_data
    chunks = chunk_pages(pages, "doc", "R-data.pdf", word_tokens, chunk_tokens=128)
    text = document_text(pages)
    by_page = {p.page: p for p in pages}
    assert [c.order for c in chunks] == list(range(len(chunks)))
    assert len({c.chunk_id for c in chunks}) == len(chunks)
    for chunk in chunks:
        page = by_page[chunk.page]
        assert chunk.n_tokens == len(word_tokens(chunk.text)) <= 128
        assert text[chunk.char_start : chunk.char_end] == chunk.text
        assert page.char_start <= chunk.char_start and chunk.char_end <= page.char_start + len(page.text)
    assert {c.page for c in chunks} == {p.page for p in pages if p.text.strip()}


def test_chunk_overlap_repeats_text_between_neighbours(r_data: list[Page]) -> None:
    pages = r_data[11:12]
    plain = chunk_pages(pages, "d", "s", word_tokens, chunk_tokens=100, overlap=0)
    overlapping = chunk_pages(pages, "d", "s", word_tokens, chunk_tokens=100, overlap=30)
    assert len(overlapping) >= len(plain) > 1
    assert overlapping[1].char_start < overlapping[0].char_end  # shared text


def test_sections_carry_into_chunks(tmp_path: Path) -> None:
    pages = read_document(write(tmp_path / "g.md", "# Alpha\nOne.\n# Beta\nTwo."), MB)
    chunks = chunk_pages(pages, "d", "g.md", word_tokens)
    assert [(c.section, c.page, c.label()) for c in chunks] == [
        ("Alpha", None, "g.md, Alpha"), ("Beta", None, "g.md, Beta")
    ]


def test_chunk_settings_are_validated() -> None:
    with pytest.raises(ValueError):
        chunk_pages([], "d", "s", word_tokens, chunk_tokens=10, overlap=10)
