"""One layer's attention for several sessions on one shared document prefix: the batched kernel
call (each shared block read once for every session's rows, the prefix read in place) against
the path it replaced (each session alone, its prefix and own slots copied into one K/V first).

Shapes follow Qwen2.5-1.5B (2 K/V heads, head_dim 128, 12 query heads), bf16 K/V and queries;
each session owns a few hundred question-and-answer slots after the prefix. Both paths run
interleaved, and their outputs are checked equal bit for bit before timing. Wall-clock and
process CPU time are both reported: on a shared host, where a preempted thread holds up the
others at every barrier, CPU time (or --threads 1) is the steadier of the two.

    python -m bench.attention_batch [--prefix 16384] [--sessions 1,2,4,8] [--tokens 1,7] [--repeats 30]
                                    [--threads N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch

from app.reexports import native_attention
from app.reexports import transformer_module as model_module

N_KV, GROUP, HEAD_DIM = 2, 6, 128
DTYPE = torch.bfloat16


def kv(length: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """K/V of `length` slots, as strided views of a larger preallocated cache."""
    spare = 64
    keys = torch.randn(N_KV, length + spare, HEAD_DIM, generator=gen).to(DTYPE)
    values = torch.randn(N_KV, length + spare, HEAD_DIM, generator=gen).to(DTYPE)
    return keys[:, :length], values[:, :length]


def sessions(n: int, tokens: int, base: tuple[torch.Tensor, torch.Tensor], gen: torch.Generator) -> list:
    """n sessions after the shared base, each with its own question-and-answer slots and new tokens."""
    items = []
    for s in range(n):
        own = kv(200 + 50 * s + tokens, gen)
        q = torch.randn(tokens, N_KV * GROUP, HEAD_DIM, generator=gen).to(DTYPE)
        items.append(model_module.Attend(q, (base, own), tokens))
    return items


def each_joined(items: list) -> list[torch.Tensor]:
    """The path it replaced: every session alone, over its base and own K/V copied into one."""
    kernel = native_attention()
    out = []
    for item in items:
        keys = torch.cat([k for k, _ in item.segments], dim=1)
        values = torch.cat([v for _, v in item.segments], dim=1)
        out.append(kernel(item.q, keys, values, item.n_queries))
    return out


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    """Wall-clock and process CPU milliseconds of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return (time.perf_counter() - wall) * 1e3, (time.process_time() - cpu) * 1e3


def bench(prefix: int, counts: list[int], token_counts: list[int], repeats: int) -> list[dict]:
    kernel = native_attention()
    if kernel is None:
        raise SystemExit("the attention kernel did not build: bench.attention_batch times it")
    gen = torch.Generator().manual_seed(0)
    base = kv(prefix, gen)
    rows = []
    for tokens in token_counts:
        for n in counts:
            items = sessions(n, tokens, base, gen)
            batched = kernel.attend_all(items)
            for ours, theirs in zip(batched, each_joined(items), strict=True):
                if not torch.equal(ours, theirs):
                    raise SystemExit(f"{n} sessions x {tokens} tokens: the batched call's bits differ")
            shared, joined = [], []
            for _ in range(repeats):  # interleaved: both paths see the same machine load
                shared.append(timed(lambda items=items: kernel.attend_all(items)))
                joined.append(timed(lambda items=items: each_joined(items)))
            rows.append({"sessions": n, "tokens": tokens,
                         "shared_ms": statistics.median(w for w, _ in shared),
                         "joined_ms": statistics.median(w for w, _ in joined),
                         "shared_cpu_ms": statistics.median(c for _, c in shared),
                         "joined_cpu_ms": statistics.median(c for _, c in joined)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prefix", type=int, default=16384, help="shared keys (a multiple of 512)")
    parser.add_argument("--sessions", default="1,2,4,8")
    parser.add_argument("--tokens", default="1,7", help="new tokens per session")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, help="torch's (and so the kernel's) thread count; default torch's")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    counts = [int(x) for x in args.sessions.split(",")]
    token_counts = [int(x) for x in args.tokens.split(",")]
    rows = bench(args.prefix, counts, token_counts, args.repeats)
    print(f"shared prefix {args.prefix} keys, {N_KV} K/V heads x {HEAD_DIM}, group {GROUP}, bf16, "
          f"{torch.get_num_threads()} threads, kernel {native_attention().isa}; median of {args.repeats}")
    print("| sessions | tokens each | batched on the base: wall / CPU ms | each joined alone: wall / CPU ms |"
          " speed-up wall / CPU |")
    print("|---:|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['sessions']} | {row['tokens']} | {row['shared_ms']:.2f} / {row['shared_cpu_ms']:.2f} | "
              f"{row['joined_ms']:.2f} / {row['joined_cpu_ms']:.2f} | {row['joined_ms'] / row['shared_ms']:.2f}x / "
              f"{row['joined_cpu_ms'] / row['shared_cpu_ms']:.2f}x |")
    if args.json:
        with open(args.json, "w") as out:
            json.dump(rows, out, indent=1)


if __name__ == "__main__":
    main()
