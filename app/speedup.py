"""Speedup over long-context (LC) decoding: measured in the same run, or the last LC measurement.

The UI and CLI never invent a speedup. A side-by-side run measures LC on the same input; without
one, the figure is the method's decode speed over the last LC decode speed recorded on this
machine for a similar context length on the same engine (weights, kernels, threads), and it is
labelled that way.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from app.atomic import write_text_atomically
from app.engine_label import engine_label
from decoding.methods import BASELINE
from decoding.stats import Stats


@dataclass(frozen=True)
class Speedup:
    value: float | None
    label: str  # how it was obtained, shown beside the figure


def context_bucket(tokens: int) -> int:
    """Round to the nearest power of two (1K, 2K, 4K, ...): decode speed depends on cache length."""
    bucket = 1024
    while bucket * 1.5 < tokens:
        bucket *= 2
    return bucket


def reference_key(target: str, stats: Stats) -> str:
    """Target, engine and context bucket: an LC speed measured on another engine is no reference."""
    return f"{target}|{engine_label(stats.engine)}@{context_bucket(stats.context_tokens)}"


class LcReference:
    """The last measured LC decode speed per (target model, engine, context bucket), kept on disk.

    The file is read once, when first needed (the UI asks for a speedup at every target pass), and
    written through on every new LC measurement. Several processes may share it (two `ask serve`
    on one home): a write reads the file again and adds its entry to what is there, and replaces the
    file whole, so no process drops another's entries or reads a half-written file.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._data: dict[str, dict[str, float]] | None = None

    def _read(self) -> dict[str, dict[str, float]]:
        if self._data is None:
            self._data = self._load()
        return self._data

    def _load(self) -> dict[str, dict[str, float]]:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    def record(self, target: str, stats: Stats) -> None:
        if stats.method != BASELINE or not stats.decode_tokens_per_s:
            return
        with self._lock:
            data = self._data = self._load()  # with what other processes recorded since
            data[reference_key(target, stats)] = {
                "tokens_per_s": stats.decode_tokens_per_s,
                "context_tokens": stats.context_tokens,
                "engine": engine_label(stats.engine),
                "at": time.time(),
            }
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomically(self.path, json.dumps(data, indent=1))

    def speedup(self, target: str, stats: Stats) -> Speedup:
        if stats.method == BASELINE:
            return Speedup(1.0, "LC itself")
        entry = self._read().get(reference_key(target, stats))
        if entry is None or not stats.decode_tokens_per_s:
            return Speedup(None, "no LC run measured yet on this engine at this context length (use compare)")
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(entry["at"]))
        return Speedup(
            stats.decode_tokens_per_s / entry["tokens_per_s"],
            f"vs last measured LC run ({entry['context_tokens']} context tokens, {when}, "
            f"{engine_label(stats.engine)})",
        )


def measured_speedup(method_stats: Stats, lc_stats: Stats) -> Speedup:
    if not method_stats.decode_tokens_per_s or not lc_stats.decode_tokens_per_s:
        return Speedup(None, "not measurable (no decode time)")
    return Speedup(
        method_stats.decode_tokens_per_s / lc_stats.decode_tokens_per_s,
        "measured side by side on this input",
    )
