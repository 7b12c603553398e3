"""Small files that several processes sharing one home write (two `ask serve` on one corpus)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from app.speedup import LcReference
from decoding.stats import Stats

DENSE = {"engine": "dense bfloat16 weights, cpu", "linear_kernel": "torch", "attention_kernel": "C attention kernel",
         "threads": "8", "warning": ""}
QUANT = DENSE | {"engine": "quantized weights, bfloat16 activations, cpu", "linear_kernel": "C quant kernel"}


def _lc(engine: dict[str, str], tokens_per_s: float) -> Stats:
    return Stats(method="lc", context_tokens=4000, generated=11, decode_s=10 / tokens_per_s, engine=engine,
                 target_passes=11, accepted_lengths=[1] * 11)


def test_lc_references_recorded_by_two_processes_are_both_kept(tmp_path: Path) -> None:
    path = tmp_path / "lc_reference.json"
    first, second = LcReference(path), LcReference(path)
    second.speedup("target", Stats(method="rapid", context_tokens=4000, generated=11, decode_s=1.0,
                                   engine=QUANT, target_passes=5, accepted_lengths=[2] * 5))  # reads the empty file
    first.record("target", _lc(DENSE, 2.0))
    second.record("target", _lc(QUANT, 4.0))
    assert len(json.loads(path.read_text())) == 2


def test_a_failed_lc_reference_write_leaves_the_previous_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "lc_reference.json"
    LcReference(path).record("target", _lc(DENSE, 2.0))
    before = path.read_text()
    real_open = io.open

    class Full:  # a disk that fills up during the write
        def __init__(self, handle: io.TextIOWrapper) -> None:
            self.handle = handle

        def write(self, text: str) -> int:
            raise OSError(28, "No space left on device")

        def __enter__(self) -> Full:
            return self

        def __exit__(self, *exc: object) -> None:
            self.handle.close()

    def full_open(file, mode="r", *args, **kwargs):  # type: ignore[no-untyped-def]
        handle = real_open(file, mode, *args, **kwargs)
        return Full(handle) if "w" in mode else handle

    monkeypatch.setattr(io, "open", full_open)
    with pytest.raises(OSError, match="No space"):
        LcReference(path).record("target", _lc(QUANT, 4.0))
    monkeypatch.undo()
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["lc_reference.json"]
