"""Weight GEMMs of a decoder's layers: the quantized C kernel against prepacked bf16 (oneDNN).

Distinct weights per layer are streamed, as in a real forward (one reused matrix would sit in the
L3 cache and read at several times memory speed). Shapes and block formats follow the embedded
Qwen2.5-Coder-1.5B (Q4_K_M: q/k/o/gate/up 4-bit, v and down 8-bit in every other layer).

    python -m bench.quant_linear [--layers 28] [--rows 1,2,6,12,32] [--repeats 7] [--no-bf16]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch import nn

from decoding.model import PackedLinear
from decoding.quant import QuantLinear, QuantWeight, native_quant

DIM, INTERMEDIATE, KV = 1536, 8960, 256


def random_weight(kind: int, group: int, n: int, k: int, gen: torch.Generator) -> QuantWeight:
    tiles, groups = n // 16, k // group
    tile_bytes = 256 if kind == 4 else 16 * group
    q = torch.randint(0, 256, (tiles, groups, tile_bytes), dtype=torch.uint8, generator=gen)
    scale = torch.rand(tiles, groups, 16, generator=gen) * 1e-2
    minimum = torch.rand(tiles, groups, 16, generator=gen) * 1e-2 if kind == 4 else None
    return QuantWeight(kind, group, n, k, q, scale, minimum)


def quant_layers(n_layers: int) -> list[list[QuantLinear]]:
    gen = torch.Generator().manual_seed(0)
    layers = []
    for i in range(n_layers):
        eight = i % 2 == 0
        v = random_weight(8, 16, KV, DIM, gen) if eight else random_weight(4, 32, KV, DIM, gen)
        down = random_weight(8, 16, DIM, INTERMEDIATE, gen) if eight else random_weight(4, 32, DIM, INTERMEDIATE, gen)
        layers.append([
            QuantLinear([random_weight(4, 32, DIM + KV, DIM, gen), v], torch.zeros(DIM + 2 * KV)),
            QuantLinear([random_weight(4, 32, DIM, DIM, gen)], None),
            QuantLinear([random_weight(4, 32, 2 * INTERMEDIATE, DIM, gen)], None),
            QuantLinear([down], None),
        ])
    return layers


def bf16_layers(n_layers: int) -> list[list[nn.Module]]:
    def packed(n: int, k: int, bias: bool = False) -> PackedLinear:
        linear = nn.Linear(k, n, bias=bias, dtype=torch.bfloat16)
        return PackedLinear(linear)

    with torch.no_grad():
        return [[packed(DIM + 2 * KV, DIM, True), packed(DIM, DIM), packed(2 * INTERMEDIATE, DIM),
                 packed(DIM, INTERMEDIATE)] for _ in range(n_layers)]


def run_layers(layers: list[list[nn.Module]], rows: int) -> float:
    x = torch.randn(rows, DIM, dtype=torch.bfloat16)
    h = torch.randn(rows, INTERMEDIATE, dtype=torch.bfloat16)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for qkv, o, gate_up, down in layers:
            qkv(x)
            o(x)
            gate_up(x)
            down(h)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--rows", default="1,2,6,12,32")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--no-bf16", action="store_true")
    args = parser.parse_args()
    kernel = native_quant()
    if kernel is None:
        raise SystemExit("the quantized kernel did not build here (is cc installed?)")
    rows = [int(r) for r in args.rows.split(",")]
    engines: dict[str, list[list[nn.Module]]] = {"quant": quant_layers(args.layers)}
    if not args.no_bf16:
        engines["bf16"] = bf16_layers(args.layers)
    times: dict[str, dict[int, list[float]]] = {name: {r: [] for r in rows} for name in engines}
    for layers in engines.values():
        run_layers(layers, 2)  # warm-up: page in the weights, start the threads
    for _ in range(args.repeats):  # interleaved, so both see the same host load
        for r in rows:
            for name, layers in engines.items():
                times[name][r].append(run_layers(layers, r))
    result = {name: {r: round(statistics.median(ts) * 1000, 2) for r, ts in by_rows.items()}
              for name, by_rows in times.items()}
    qbytes = sum(linear.nbytes for layer in engines["quant"] for linear in layer)
    print(json.dumps({"layers": args.layers, "threads": torch.get_num_threads(), "vnni": kernel.vnni,
                      "quant_weight_bytes": qbytes, "median_ms": result}, indent=1))
    for r in rows:
        line = f"rows {r:>3}: quant {result['quant'][r]:8.1f} ms"
        if "bf16" in result:
            line += f"   bf16 {result['bf16'][r]:8.1f} ms"
        line += f"   quant GB/s {qbytes / result['quant'][r] / 1e6:6.1f}"
        print(line)


if __name__ == "__main__":
    main()
