"""What deleting a document removes besides its index rows: its uploaded copy and where its tokens
were cached (the prefix cache's entries that hold it; its chunk KV goes with app.chunk_kv.prune)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

from decoding.loaded_model import Prompt
from retrieval.types import DocumentInfo
from retrieval.windows import Window


def _sha256(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def upload_copies(uploads_dir: Path, doc: DocumentInfo) -> list[Path]:
    """The kept copies of an upload (ui.uploads names them after the source, or adds the content
    hash's first 8 digits when another file took the name) holding exactly this document's bytes."""
    source = Path(doc.source)
    names = {doc.source, f"{source.stem}-{doc.sha256[:8]}{source.suffix}"}
    found = []
    for name in names:
        path = uploads_dir / name
        if path.parent == uploads_dir and path.is_file() and not path.is_symlink() and _sha256(path) == doc.sha256:
            found.append(path)
    return found


def document_cuts(windows: Sequence[Window], prompts: Sequence[Prompt], doc_id: str) -> list[tuple[list[int], int]]:
    """(a window's document prefix, where the document's piece in it ends) for every window holding
    part of the document: any cached prefix starting with prefix[:end] holds the document's tokens."""
    found = []
    for window, prompt in zip(windows, prompts, strict=True):
        cuts = prompt.cuts()  # the header's end, then each piece's end
        for i, part in enumerate(window.parts):
            if part.doc_id == doc_id:
                found.append((prompt.prefix, cuts[i + 1]))
    return found
