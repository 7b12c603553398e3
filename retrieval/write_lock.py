"""The index's write lock, held across threads and processes.

Two processes may write one index (two `ask serve` on one corpus). The write protocol (index.py)
and the recovery on open must then not interleave: a process opening the index would otherwise take
another's document, pending while its vectors are written, for a crashed write and remove it. An
advisory lock on a file in the index folder serialises them; the kernel releases it when its
holder dies, so a crashed writer never leaves the index locked, and what it left pending is then
truly abandoned.
"""

from __future__ import annotations

import fcntl
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LOCK_FILE = "write.lock"


class WriteLock:
    def __init__(self, directory: Path) -> None:
        self._path = directory / LOCK_FILE

    @contextmanager
    def held(self) -> Iterator[None]:
        # An open file of its own per holder: flock locks belong to an open file, so this process's
        # threads exclude each other as other processes do.
        with self._path.open("a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
