"""Upload storage policy: safe file names, private copies, and what is kept in the uploads folder.

A browser's file name is never trusted: it is reduced to one that can only name a file directly
inside the uploads folder, and what gets indexed is a private copy, so what is kept is exactly
what was indexed.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path

from app.config import Limits
from app.reexports import HybridIndex, RetrievalError, supported_extensions
from ui.render import UNEXPECTED, size_text
from ui.upload_line import UploadLine

logger = logging.getLogger("rapidqa.ui")

# Keeps a file name within the 255-byte limit of common filesystems, with room for a hash suffix.
MAX_NAME_BYTES = 150
_UNSAFE_NAME_CHARS = re.compile(r'[<>:"|?*]')


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


def _sha256(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


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
