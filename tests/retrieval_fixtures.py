"""Helpers for the retrieval tests: a cheap tokenizer, a model-free embedder, file builders.

Kept out of conftest.py on purpose (decoding/ and app/ tests share the tests folder); test files
import what they need from here.
"""

from __future__ import annotations

import hashlib
import io
import math
import re
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
R_DATA = REPO / "data" / "R-data.pdf"
R_FAQ = REPO / "tests" / "fixtures" / "R-FAQ.pdf"
LABELS = REPO / "data" / "retrieval_labels.jsonl"

_WORD = re.compile(r"\w+|[^\w\s]")


def word_tokens(text: str) -> list[str]:
    """Stands in for the target model's tokenizer: one token per word or punctuation mark."""
    return _WORD.findall(text)


class HashEmbedder:
    """A deterministic bag-of-words embedder (hashed into 384 dims): texts sharing words are close.

    Same interface as retrieval.embedding.Embedder, no model to load, so index tests stay fast.
    """

    dims = 384

    def load(self) -> None:
        pass

    def embed(self, texts: list[str]) -> list[list[float]]:
        return [self._vector(text) for text in texts]

    def embed_query(self, text: str) -> list[float]:
        return self._vector(text)

    def embed_passages(self, texts: list[str]) -> list[list[list[float]]]:
        return [[vector] for vector in self.embed(texts)]

    def _vector(self, text: str) -> list[float]:
        vector = [0.0] * self.dims
        for word in re.findall(r"\w+", text.lower()):
            digest = hashlib.md5(word.encode()).digest()
            vector[int.from_bytes(digest[:4], "little") % self.dims] += 1.0
        norm = math.sqrt(sum(v * v for v in vector))
        if norm == 0:
            return [1.0] + [0.0] * (self.dims - 1)
        return [v / norm for v in vector]


# --- file builders -----------------------------------------------------------------------------


def text_pdf(pages: Sequence[str]) -> bytes:
    """A minimal valid PDF with one line of Helvetica text per page (enough for a text layer)."""
    objects: list[bytes] = []
    n = len(pages)
    page_ids = [4 + 2 * i for i in range(n)]
    objects.append(b"<< /Type /Catalog /Pages 2 0 R >>")
    kids = " ".join(f"{pid} 0 R" for pid in page_ids)
    objects.append(f"<< /Type /Pages /Kids [{kids}] /Count {n} >>".encode())
    objects.append(b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>")
    for i, text in enumerate(pages):
        escaped = text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")
        stream = f"BT /F1 12 Tf 72 720 Td ({escaped}) Tj ET".encode("latin-1")
        objects.append(
            f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources << /Font << /F1 3 0 R >> >> "
            f"/Contents {page_ids[i] + 1} 0 R >>".encode()
        )
        objects.append(b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream")
    out = io.BytesIO()
    out.write(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(out.tell())
        out.write(b"%d 0 obj\n" % number + body + b"\nendobj\n")
    xref = out.tell()
    out.write(b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1))
    for offset in offsets:
        out.write(b"%010d 00000 n \n" % offset)
    out.write(b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref))
    return out.getvalue()


def blank_pdf(n_pages: int) -> bytes:
    """Pages with no text layer at all, like a scan without OCR (n_pages=0 gives a page-less PDF)."""
    from pypdf import PdfWriter

    writer = PdfWriter()
    for _ in range(n_pages):
        writer.add_blank_page(width=612, height=792)
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def encrypted_pdf(user_password: str) -> bytes:
    """A text PDF encrypted with RC4 (pypdf writes and reads RC4 without optional packages)."""
    from pypdf import PdfReader, PdfWriter

    writer = PdfWriter(clone_from=PdfReader(io.BytesIO(text_pdf(["Secret quarterly figures"]))))
    writer.encrypt(user_password=user_password, owner_password="owner-secret", algorithm="RC4-128")
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def docx_bytes(sections: Sequence[tuple[str, Sequence[str]]], table: Sequence[Sequence[str]] = ()) -> bytes:
    """A Word document: (heading, paragraphs) sections, then an optional table."""
    import docx

    document = docx.Document()
    for heading, paragraphs in sections:
        document.add_heading(heading, level=1)
        for paragraph in paragraphs:
            document.add_paragraph(paragraph)
    if table:
        grid = document.add_table(rows=len(table), cols=len(table[0]))
        for r, row in enumerate(table):
            for c, cell in enumerate(row):
                grid.cell(r, c).text = cell
    out = io.BytesIO()
    document.save(out)
    return out.getvalue()


def write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        path.write_text(data, encoding="utf-8")
    else:
        path.write_bytes(data)
    return path


def hostile_files(folder: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, words the IngestError message must contain), one per bad input we refuse."""
    truncated = R_DATA.read_bytes()[: R_DATA.stat().st_size // 2]
    return {
        "unsupported": (write(folder / "tool.exe", b"MZ\x90\x00binary"), "unsupported file type"),
        "empty": (write(folder / "empty.txt", b""), "empty"),
        "empty_pdf": (write(folder / "empty.pdf", b""), "empty"),
        "encrypted": (write(folder / "locked.pdf", encrypted_pdf("hunter2")), "password-protected"),
        "truncated": (write(folder / "truncated.pdf", truncated), "damaged or truncated"),
        "binary_pdf": (write(folder / "photo.pdf", bytes(range(256)) * 64), "not a PDF"),
        "scanned": (write(folder / "scan.pdf", blank_pdf(2)), "no extractable text (scanned?)"),
        "zero_pages": (write(folder / "nopages.pdf", blank_pdf(0)), "no pages"),
        "not_utf8": (write(folder / "legacy.txt", b"\x81\x8d\x8f\x90 caf\xe9 \x9d"), "not UTF-8"),
        "binary_txt": (write(folder / "data.txt", b"abc\x00\x01\x02def"), "binary data"),
        "docx_not_zip": (write(folder / "report.docx", b"this is not a zip archive"), "not a zip archive"),
        "docx_bad_zip": (write(folder / "fake.docx", _zip_without_document()), "not a readable Word document"),
    }


def _zip_without_document() -> bytes:
    import zipfile

    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        archive.writestr("hello.txt", "a zip, but not a Word document")
    return out.getvalue()
