"""The drafter's KV per chunk, built at ingest and stored with the index.

At question time RAPID's drafter reads its retrieved passages from these (decoding.segments puts
them at their positions after the prompt header) and prefills only the question. Each passage is
encoded after the drafter prompt's header, as a prompt read in one go would have it, not alone
(decoding.segments says why). Files live in
<index>/chunk_kv/<drafter key>/<chunk id>.<tokens hash>.safetensors: the drafter key changes with
the drafter's weights, dtype and the engine's code, the tokens hash with the header's and the
passage's exact tokens, so a file is used only for the very tokens it was computed from.

Disk stays bounded: each store evicts its least recently read files past `max_bytes`, opening a
store removes the folders of the same drafter under other engine stamps (and folders of older
versions, which carry no owner), and prepare removes files no current passage is named by.

Several processes may share an index (two `ask serve` on one corpus), so nothing here deletes a
file it cannot know to be dead: a store's folder appears with its owner already in it (never
ownerless, even for a moment), keep_only touches only the chunks it is given (another process may
have just added others), and prune reads which chunks live only after listing the files.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from app.atomic import write_text_atomically
from decoding.cache import KVCache
from decoding.loaded_model import Prompt
from decoding.prefill import PrefixCacheHooks
from decoding.prefix_cache import KVStore
from decoding.segments import PieceKV, assemble, encode_piece
from decoding.transformer import Run, Transformer

CHUNK_KV_DIR = "chunk_kv"
OWNER_FILE = "owner.txt"  # in each store's folder: which drafter (name, weights, dtype) it holds
HEADER_DIR = "header"  # in each store's folder: the prompt header's KV, apart from the chunks' files

# (tokens done, tokens total) while chunks are encoded
BuildProgress = Callable[[int, int], None]


@dataclass(frozen=True)
class Passage:
    chunk_id: str
    tokens: list[int]


def tokens_hash(tokens: Sequence[int]) -> str:
    return hashlib.sha256(torch.tensor(list(tokens), dtype=torch.int64).numpy().tobytes()).hexdigest()[:16]


class ChunkKV:
    """One drafter's per-chunk KV for one index, every passage read after the prompt header `header`."""

    def __init__(self, index_dir: Path, model: Transformer, model_key: str, header: Sequence[int],
                 owner: str = "", max_bytes: int | None = None) -> None:
        """owner names the drafter apart from the engine's code (e.g. its name, weights and dtype):
        another folder of the same owner is a stale engine stamp's and is removed."""
        self.model = model
        self.header = list(header)
        self.store = KVStore(index_dir / CHUNK_KV_DIR / model_key[:32], max_bytes)
        self.owner = owner
        self._claimed = False
        if self.store.directory.parent.is_dir():  # nothing is created before the first write
            self._claim()
            remove_stale_stores(self.store.directory, owner)
        self._header_kv: PieceKV | None = None

    def _claim(self) -> None:
        """Name this store's owner in its folder (before its first file), so no other store removes it."""
        if not self._claimed:
            _create_owned(self.store.directory, self.owner)
            self._claimed = True

    def _write(self, passage: Passage, piece: PieceKV) -> None:
        self._claim()
        self.store.write(self.name(passage), piece)

    def name(self, passage: Passage) -> str:
        return f"{passage.chunk_id}.{tokens_hash([*self.header, -1, *passage.tokens])}"

    def missing(self, passages: Sequence[Passage]) -> list[Passage]:
        present = set(self.store.names())
        return [p for p in passages if self.name(p) not in present]

    def keep_only(self, passages: Sequence[Passage]) -> int:
        """Remove the files of these passages' chunks that no passage is named by (other headers,
        older naming schemes); returns how many went. Other chunks' files are prune's: another
        process may have added those chunks since the passages were listed."""
        wanted = {self.name(p) for p in passages}
        chunks = {p.chunk_id for p in passages}
        stale = [name for name in self.store.names() if name not in wanted and name.split(".", 1)[0] in chunks]
        for name in stale:
            self.store.delete(name)
        return len(stale)

    def build(self, passages: Sequence[Passage], progress: BuildProgress | None = None,
              run: Run | None = None) -> float:
        """Encode and store the passages that have no KV yet; returns the seconds spent encoding.
        run: who runs the passes (the engine's scheduler)."""
        todo = self.missing(passages)
        total, done, spent = sum(len(p.tokens) for p in todo), 0, 0.0
        if todo:
            self.header_kv(run)
        for passage in todo:
            start = time.perf_counter()
            piece = encode_piece(self.model, passage.tokens, after=self.header, run=run)
            spent += time.perf_counter() - start
            self._write(passage, piece)
            done += len(passage.tokens)
            if progress is not None:
                progress(done, total)
        return spent

    def piece(self, passage: Passage, run: Run | None = None) -> PieceKV:
        stored = self.store.read(self.name(passage), self.model.device)
        if stored is not None:
            return stored
        # Not built at ingest (an older index, or another drafter): encoded now.
        piece = encode_piece(self.model, passage.tokens, after=self.header, run=run)
        self._write(passage, piece)
        return piece

    def header_kv(self, run: Run | None = None) -> PieceKV:
        """The header's KV: stored like a passage's (built at ingest), so a question's process
        reads it instead of running the drafter over the header before its first draft. Its own
        folder keeps it out of the chunks' listing, bound and pruning."""
        if self._header_kv is None:
            headers, name = KVStore(self.store.directory / HEADER_DIR), tokens_hash(self.header)
            stored = headers.read(name, self.model.device)
            if stored is None:
                stored = encode_piece(self.model, self.header, run=run)
                self._claim()
                headers.write(name, stored)
            self._header_kv = stored
        return self._header_kv

    @staticmethod
    def prompt_passages(prompt: Prompt, chunk_ids: Sequence[str]) -> list[Passage]:
        """The passages of a drafter prompt made of these chunks, one per chunk id."""
        pieces = prompt.pieces()
        if len(pieces) != len(chunk_ids):
            raise ValueError(f"{len(chunk_ids)} chunk ids for {len(pieces)} passages")
        return [Passage(chunk_id, tokens) for chunk_id, tokens in zip(chunk_ids, pieces, strict=True)]

    def hooks(self, prompt: Prompt, chunk_ids: Sequence[str], run: Run | None = None) -> PrefixCacheHooks:
        """Serves exactly this prompt's prefix (header + one passage per chunk id) to this drafter;
        run: who runs the passes of a passage encoded now."""
        if prompt.header != self.header:
            raise ValueError("the prompt's header is not the one this store's passages are read after")
        passages = self.prompt_passages(prompt, chunk_ids)

        def load(model: Transformer, prefix: list[int], capacity: int) -> KVCache | None:
            if model is not self.model or prefix != prompt.prefix:
                return None
            return assemble(model, [self.header_kv(run), *(self.piece(p, run) for p in passages)], capacity)

        return PrefixCacheHooks(load=load, save=lambda model, prefix, cache: None)


def prune(index_dir: Path, live_chunk_ids: Callable[[], set[str]]) -> int:
    """Remove every drafter's KV of chunks the index no longer has; returns how many files went.

    The live chunks are read after the files are listed: a chunk's KV is written only after its
    document is committed, so every listed file of a live chunk (another process's new one too)
    is among them."""
    files = list((index_dir / CHUNK_KV_DIR).glob("*/*.safetensors"))
    live = live_chunk_ids()
    removed = 0
    for path in files:
        if path.name.split(".", 1)[0] not in live:
            path.unlink(missing_ok=True)
            removed += 1
    return removed


def remove_stale_stores(directory: Path, owner: str) -> int:
    """Remove the sibling folders of `directory` that hold the same owner's KV (made under another
    engine stamp) or name no owner (made before owners were recorded); returns how many went."""
    removed = 0
    for folder in directory.parent.iterdir():
        if folder == directory or not folder.is_dir() or folder.name.startswith(_CLAIMING):
            continue
        try:
            theirs: str | None = (folder / OWNER_FILE).read_text()
        except FileNotFoundError:
            theirs = None
        if theirs is None or theirs == owner:
            shutil.rmtree(folder, ignore_errors=True)
            removed += 1
    return removed


_CLAIMING = ".claiming-"  # a store folder being created, its owner written before it appears


def _create_owned(directory: Path, owner: str) -> None:
    """Create the store's folder with its owner file already in it (a rename of a prepared
    folder), so that another process's remove_stale_stores never sees it without an owner."""
    if directory.is_dir():  # made before owners were recorded, or by another process: claimed in place
        write_text_atomically(directory / OWNER_FILE, owner)
        return
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=_CLAIMING, dir=directory.parent))
    try:
        (staging / OWNER_FILE).write_text(owner)
        try:
            os.rename(staging, directory)
        except OSError:  # another process created it first: theirs stands
            if not directory.is_dir():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
