"""Where a prefill chunk's time goes as the context grows: the whole forward and attention alone.

    python -m bench.prefill_depth [--depths 0,16384,28672] [--chunk 1024] [--kv-dtypes bf16,q8]
                                  [--model qwen2.5-coder-1.5b] [--no-peers]

One chunk of new tokens is run at each depth over a cache whose first `depth` slots stand for an
already-read prefix (their values do not change the cost; bench/kv_fill.py makes their memory real).
Attention is timed by wrapping the attention function the model calls, so the rest is the
weights' GEMMs, norms and RoPE. Each KV form (`--kv-dtypes`: bf16, or q8, the 8-bit cache) has its
own loaded model; at each depth every form runs, then llama.cpp's llama-bench on the same GGUF,
with its default f16 cache and with Q8_0 keys and values (bench/peers.py), so a slow spell of the
machine lands on every row of a depth alike.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch

from app.config import Settings
from app.reexports import PREFILL_CHUNK, Transformer, load_model
from app.reexports import transformer_module as model_module
from app.registry import resolve_model
from bench.kv_fill import filled_cache
from bench.kv_forms import load_options, parse_kv_dtypes
from bench.peers import BENCH_TOOL, PEER_CACHES, LlamaCpp, find_llama_bench, llama_cpp_bin_dir, prefill_at_depth

REPO = Path(__file__).resolve().parent.parent
WARM_UP_TOKENS = 16


class AttentionClock:
    """Seconds spent in the attention function of the model's passes while `timing()` is on."""

    def __init__(self) -> None:
        self.seconds = 0.0

    @contextmanager
    def timing(self) -> Iterator[None]:
        real_attention_for = model_module.attention_for

        def timed_attention_for(device: torch.device) -> Callable[[Sequence[object]], list[torch.Tensor]]:
            attend = real_attention_for(device)

            def timed(items: Sequence[object]) -> list[torch.Tensor]:  # decoding.attention.Attend items
                start = time.perf_counter()
                out = attend(items)
                self.seconds += time.perf_counter() - start
                return out

            return timed

        model_module.attention_for = timed_attention_for
        try:
            yield
        finally:
            model_module.attention_for = real_attention_for


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.prefill_depth", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-coder-1.5b")
    parser.add_argument("--depths", default="0,16384,28672", help="cached tokens before the chunk")
    parser.add_argument("--chunk", type=int, default=PREFILL_CHUNK, help="new tokens in the timed pass")
    parser.add_argument("--kv-dtypes", default="bf16,q8", help="KV cache forms, one row each per depth")
    parser.add_argument("--no-peers", action="store_true", help="skip llama.cpp's llama-bench (`make peers`)")
    parser.add_argument("--peer-caches", default=",".join(PEER_CACHES), help="llama.cpp KV cache types")
    parser.add_argument("--peer-runs", type=int, default=3, help="llama-bench runs per row (median)")
    parser.add_argument("--out", type=Path, default=REPO / "artifacts" / "bench_prefill_depth.json")
    args = parser.parse_args(argv)
    try:
        args.depths = [int(d) for d in args.depths.split(",") if d.strip()]
    except ValueError:
        parser.error(f"--depths takes comma-separated token counts, not {args.depths!r}")
    if not args.depths or min(args.depths) < 0:
        parser.error("--depths needs at least one depth, none negative")
    if args.chunk < 1 or args.peer_runs < 1:
        parser.error("--chunk and --peer-runs must be at least 1")
    try:
        args.kv_dtypes = parse_kv_dtypes(args.kv_dtypes)
        for form in args.kv_dtypes:
            load_options(form, load_model)
    except ValueError as error:
        parser.error(f"--kv-dtypes: {error}")
    args.peer_caches = [c for c in args.peer_caches.split(",") if c]
    if unknown := set(args.peer_caches) - set(PEER_CACHES):
        parser.error(f"unknown --peer-caches {', '.join(sorted(unknown))}; choose from {', '.join(PEER_CACHES)}")
    return args


def warm_up(model: Transformer) -> None:
    """One short pass: weights paged in and kernels loaded before any timed pass."""
    model.forward(torch.zeros(WARM_UP_TOKENS, dtype=torch.long), model.new_cache(WARM_UP_TOKENS))


def chunk_row(model: Transformer, form: str, depth: int, chunk: int) -> dict[str, object]:
    """One chunk's pass at this depth: its seconds, attention's seconds, tokens/s."""
    cache = filled_cache(model, depth, depth + chunk)
    tokens = torch.randint(model.args.vocab_size, (chunk,), generator=torch.Generator().manual_seed(depth))
    clock = AttentionClock()
    with clock.timing():
        start = time.perf_counter()
        model.forward(tokens, cache)
        total = time.perf_counter() - start
    return {"depth": depth, "engine": "rapidqa", "kv": form, "chunk_s": total, "attention_s": clock.seconds,
            "tokens_per_s": chunk / total}


def peer_row(peer: LlamaCpp, gguf: Path, depth: int, chunk: int, cache: str, runs: int) -> dict[str, object]:
    """llama-bench's row for this depth and cache type; a failed run reports its error."""
    row: dict[str, object] = {"depth": depth, "engine": "llama.cpp", "kv": cache, "attention_s": None}
    try:
        return {**row, **prefill_at_depth(peer, gguf, chunk, depth, cache, runs)}
    except (RuntimeError, OSError) as error:
        return {**row, "chunk_s": None, "tokens_per_s": None, "error": str(error)[-800:]}


def measure(models: dict[str, Transformer], depths: Sequence[int], chunk: int, peer: LlamaCpp | None,
            gguf: Path | None, caches: Sequence[str], peer_runs: int,
            emit: Callable[[dict[str, object]], None]) -> list[dict[str, object]]:
    """Every row, depth-major: each of our KV forms, then each llama.cpp cache type."""
    rows = []
    for depth in depths:
        for form, model in models.items():
            rows.append(chunk_row(model, form, depth, chunk))
            emit(rows[-1])
        if peer is not None and gguf is not None:
            for cache in caches:
                rows.append(peer_row(peer, gguf, depth, chunk, cache, peer_runs))
                emit(rows[-1])
    return rows


def with_ratios(rows: list[dict[str, object]]) -> list[dict[str, object]]:
    """Each row's tokens/s over our first KV form's at the same depth (vs_first)."""
    first: dict[object, float] = {}
    for row in rows:
        if row["engine"] == "rapidqa" and row["depth"] not in first:
            first[row["depth"]] = row["tokens_per_s"]  # type: ignore[assignment]
    return [{**row, "vs_first": row["tokens_per_s"] / first[row["depth"]]
             if row["tokens_per_s"] and row["depth"] in first else None} for row in rows]


def format_row(row: dict[str, object]) -> str:
    name = f"{row['engine']} {row['kv']}"
    if row.get("error"):
        return f"{row['depth']:>7} {name:18s} failed: {str(row['error'])[:200]}"
    attention = "-" if row["attention_s"] is None else f"{row['attention_s']:.2f}"
    return (f"{row['depth']:>7} {name:18s} {row['chunk_s']:>9.2f} {attention:>11s} "
            f"{row['tokens_per_s']:>8.1f}")


def table(rows: list[dict[str, object]]) -> list[str]:
    """The report's table: a line per row, with tokens/s relative to our first form at that depth."""
    lines = [f"{'depth':>7} {'engine kv':18s} {'s/chunk':>9s} {'attention s':>11s} {'tok/s':>8s} {'vs first':>8s}"]
    for row in with_ratios(rows):
        ratio = "" if row.get("vs_first") is None else f" {row['vs_first']:>7.2f}x"
        lines.append(format_row(row) + ratio)
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    directory = resolve_model(args.model, Settings().models_dir)
    models = {}
    for form in args.kv_dtypes:
        loaded = load_model(args.model, directory, torch.bfloat16, torch.device("cpu"), quantized=True,
                            **load_options(form, load_model))
        warm_up(loaded.model)
        models[form] = loaded.model
    peer = None if args.no_peers else find_llama_bench(Settings().home, torch.get_num_threads())
    gguf = directory / "model.gguf"
    if not args.no_peers and (peer is None or not gguf.exists()):
        missing = f"no {BENCH_TOOL} in {llama_cpp_bin_dir(Settings().home)}" if peer is None else f"no {gguf}"
        print(f"llama.cpp rows left out: {missing}")
    print(f"{args.model}, {args.chunk}-token chunk, {torch.get_num_threads()} threads")
    print(table([])[0], flush=True)
    done: list[dict[str, object]] = []

    def emit(row: dict[str, object]) -> None:
        """Print the row and write the report so far (a long run stopped midway keeps its rows)."""
        print(format_row(row), flush=True)
        done.append(row)
        write_report(args, done)

    rows = measure(models, args.depths, args.chunk, peer, gguf if gguf.exists() else None, args.peer_caches,
                   args.peer_runs, emit)
    print("\n" + "\n".join(table(rows)))
    print(json.dumps(write_report(args, rows)))
    print(f"wrote {args.out}")
    return 0


def write_report(args: argparse.Namespace, rows: list[dict[str, object]]) -> dict[str, object]:
    report = {"model": args.model, "chunk": args.chunk, "threads": torch.get_num_threads(),
              "rows": with_ratios(rows)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    raise SystemExit(main())
