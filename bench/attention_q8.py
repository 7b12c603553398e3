"""One layer's attention alone, bf16 K/V against 8-bit K/V (decoding/kv_quant.py's form), in the
C kernel: a prefill chunk at depth, a decode row and a verify block.

Shapes follow Qwen2.5-1.5B (2 K/V heads, head_dim 128, 12 query heads), bf16 queries; the 8-bit
K/V are the bf16 ones quantized, so both runs attend over the same values. A case's last `rows`
slots are its new tokens (causal). Both forms run interleaved, medians of wall-clock and process
CPU time; the largest difference between their outputs is shown (8-bit is near bf16, not equal).
A decode case walks several layers' K/V per timed call (--decode-layers), as a decode step does, so
the K/V come from memory rather than the CPU's cache; its times are per layer.

    python -m bench.attention_q8 [--prefill-keys 16384,28672] [--chunk 1024] [--decode-keys 16384]
                                 [--decode-rows 1,6] [--decode-layers 8] [--repeats 5] [--decode-repeats 30]
                                 [--threads N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch

from app.reexports import native_attention, quantize_kv

N_KV, GROUP, HEAD_DIM = 2, 6, 128


def kv(length: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """bf16 K/V of `length` slots, as strided views of a larger preallocated cache."""
    spare = 64
    keys = torch.randn(N_KV, length + spare, HEAD_DIM, generator=gen).bfloat16()
    values = torch.randn(N_KV, length + spare, HEAD_DIM, generator=gen).bfloat16()
    return keys[:, :length], values[:, :length]


def quantized(keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same K/V in the 8-bit form, also strided views of a larger cache."""
    spare = 64
    full_k = torch.empty(N_KV, keys.shape[1] + spare, HEAD_DIM, dtype=torch.bfloat16)
    full_v = torch.empty_like(full_k)
    full_k[:, : keys.shape[1]], full_v[:, : keys.shape[1]] = keys, values
    full_k[:, keys.shape[1] :], full_v[:, keys.shape[1] :] = 0, 0
    return quantize_kv(full_k)[:, : keys.shape[1]], quantize_kv(full_v)[:, : keys.shape[1]]


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    """Wall-clock and process CPU milliseconds of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return (time.perf_counter() - wall) * 1e3, (time.process_time() - cpu) * 1e3


def bench_case(kind: str, rows: int, keys: int, layers: int, repeats: int, gen: torch.Generator) -> dict:
    kernel = native_attention()
    bf16_kvs = [kv(keys, gen) for _ in range(layers)]
    q8_kvs = [quantized(*pair) for pair in bf16_kvs]
    q = torch.randn(rows, N_KV * GROUP, HEAD_DIM, generator=gen).bfloat16()
    if not (kernel.takes(q, *bf16_kvs[0]) and kernel.takes(q, *q8_kvs[0])):
        raise SystemExit(f"{kind}: the kernel does not take these shapes")
    difference = (kernel(q, *q8_kvs[0], rows).float() - kernel(q, *bf16_kvs[0], rows).float()).abs().max().item()

    def every_layer(kvs: list) -> None:
        for keys_, values in kvs:
            kernel(q, keys_, values, rows)

    bf16_times, q8_times = [], []
    for _ in range(repeats):  # interleaved: both forms see the same machine load
        bf16_times.append(timed(lambda: every_layer(bf16_kvs)))
        q8_times.append(timed(lambda: every_layer(q8_kvs)))
    def median_per_layer(times: list[tuple[float, float]], which: int) -> float:
        return statistics.median(t[which] for t in times) / layers

    return {"case": kind, "rows": rows, "keys": keys, "layers": layers,
            "bf16_ms": median_per_layer(bf16_times, 0), "bf16_cpu_ms": median_per_layer(bf16_times, 1),
            "q8_ms": median_per_layer(q8_times, 0), "q8_cpu_ms": median_per_layer(q8_times, 1),
            "max_difference": difference}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prefill-keys", default="16384,28672", help="keys before and in the chunk")
    parser.add_argument("--chunk", type=int, default=1024, help="new tokens of a prefill chunk")
    parser.add_argument("--decode-keys", type=int, default=16384)
    parser.add_argument("--decode-rows", default="1,6", help="new tokens of a decode step and a verify block")
    parser.add_argument("--decode-layers", type=int, default=8, help="layers' K/V a decode case walks per call")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per prefill case")
    parser.add_argument("--decode-repeats", type=int, default=30, help="timed calls per decode case")
    parser.add_argument("--threads", type=int, help="torch's (and so the kernel's) thread count; default torch's")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    if native_attention() is None:
        raise SystemExit("the attention kernel did not build: bench.attention_q8 times it")
    if args.threads:
        torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    results = [bench_case("prefill", args.chunk, int(keys), 1, args.repeats, gen)
               for keys in args.prefill_keys.split(",")]
    results += [bench_case("decode" if int(rows) == 1 else "verify", int(rows), args.decode_keys, args.decode_layers,
                           args.decode_repeats, gen) for rows in args.decode_rows.split(",")]
    print(f"{N_KV} K/V heads x {HEAD_DIM}, group {GROUP}, bf16 queries, {torch.get_num_threads()} threads, "
          f"kernel {native_attention().isa}; medians, interleaved")
    print("| case | new rows | keys | layers per call | bf16 K/V: wall / CPU ms per layer | 8-bit K/V: wall / CPU ms"
          " per layer | speed-up wall / CPU | max difference |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for row in results:
        print(f"| {row['case']} | {row['rows']} | {row['keys']} | {row['layers']} | "
              f"{row['bf16_ms']:.2f} / {row['bf16_cpu_ms']:.2f} | "
              f"{row['q8_ms']:.2f} / {row['q8_cpu_ms']:.2f} | {row['bf16_ms'] / row['q8_ms']:.2f}x / "
              f"{row['bf16_cpu_ms'] / row['q8_cpu_ms']:.2f}x | {row['max_difference']:.4f} |")
    if args.json:
        with open(args.json, "w") as out:
            json.dump(results, out, indent=1)


if __name__ == "__main__":
    main()
