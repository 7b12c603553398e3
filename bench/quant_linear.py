"""Weight GEMMs of a decoder's layers: the quantized C kernel against prepacked bf16 (oneDNN).

Distinct weights per layer are streamed, as in a real forward (one reused matrix would sit in the
L3 cache and read at several times memory speed). Shapes and block formats follow the embedded
Qwen2.5-Coder-1.5B (Q4_K_M: q/k/o/gate/up 4-bit, v and down 6-bit in every other layer).

    python -m bench.quant_linear [--layers 28] [--rows 1,2,6,12,32] [--repeats 7] [--engines quant,bf16]
    python -m bench.quant_linear --layers 4 --rows 1024 --repeats 3 --engines quant,bf16,dequant   # prefill

Engines: quant (the C kernel), bf16 (PackedLinear), dequant (each weight dequantized to bf16, then
F.linear: the alternative prefill path). Wall-clock and process CPU time are both reported: on a
shared host CPU time is the steadier of the two.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from app.reexports import PackedLinear, QuantLinear, QuantWeight, native_quant

DIM, INTERMEDIATE, KV = 1536, 8960, 256


def random_weight(kind: int, group: int, n: int, k: int, gen: torch.Generator) -> QuantWeight:
    """Random values and scales in the GGUF's own shapes (Q4_K for kind 4, Q6_K for kind 6)."""
    tiles, groups = n // 16, k // group
    per = 256 // group
    supers = -(-groups // per)

    def top() -> torch.Tensor:
        return (torch.rand(tiles, supers, 16, generator=gen) * 1e-3).half()

    def sub() -> torch.Tensor:
        return torch.randint(0, 64, (tiles, groups, 16), dtype=torch.int8, generator=gen)

    shape = (tiles, k // 32, 384) if kind == 6 else (tiles, groups, 256 if kind == 4 else 16 * group)
    q = torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen)
    if kind == 4:
        return QuantWeight(kind, group, n, k, q, top(), sub(), top(), sub(), per)
    return QuantWeight(kind, group, n, k, q, top(), sub(), None, None, per)


def quant_layers(n_layers: int) -> list[list[QuantLinear]]:
    gen = torch.Generator().manual_seed(0)
    layers = []
    for i in range(n_layers):
        six = i % 2 == 0
        v = random_weight(6, 16, KV, DIM, gen) if six else random_weight(4, 32, KV, DIM, gen)
        down = random_weight(6, 16, DIM, INTERMEDIATE, gen) if six else random_weight(4, 32, DIM, INTERMEDIATE, gen)
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


class Dequantized(nn.Module):
    def __init__(self, linear: QuantLinear) -> None:
        super().__init__()
        self.linear = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.linear.bias is None else self.linear.bias.to(x.dtype)
        return F.linear(x, self.linear.dense(x.dtype), bias)


def run_layers(layers: list[list[nn.Module]], rows: int) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) for one pass over the layers."""
    x = torch.randn(rows, DIM, dtype=torch.bfloat16)
    h = torch.randn(rows, INTERMEDIATE, dtype=torch.bfloat16)
    t0, c0 = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        for qkv, o, gate_up, down in layers:
            qkv(x)
            o(x)
            gate_up(x)
            down(h)
    return time.perf_counter() - t0, time.process_time() - c0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--rows", default="1,2,6,12,32")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=0, help="torch (and kernel) threads; 0: torch's default")
    parser.add_argument("--engines", default="quant,bf16")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    kernel = native_quant()
    if kernel is None:
        raise SystemExit("the quantized kernel did not build here (is cc installed?)")
    rows = [int(r) for r in args.rows.split(",")]
    names = args.engines.split(",")
    quant = quant_layers(args.layers)
    engines: dict[str, list[list[nn.Module]]] = {}
    for name in names:
        if name == "quant":
            engines[name] = quant
        elif name == "bf16":
            engines[name] = bf16_layers(args.layers)
        elif name == "dequant":
            engines[name] = [[Dequantized(linear) for linear in layer] for layer in quant]
        else:
            raise SystemExit(f"unknown engine {name}")
    times: dict[str, dict[int, list[tuple[float, float]]]] = {name: {r: [] for r in rows} for name in engines}
    for layers in engines.values():
        run_layers(layers, 2)  # warm-up: page in the weights, start the threads
    for _ in range(args.repeats):  # interleaved, so every engine sees the same host load
        for r in rows:
            for name, layers in engines.items():
                times[name][r].append(run_layers(layers, r))
    wall = {name: {r: round(statistics.median(t[0] for t in ts) * 1000, 2) for r, ts in by_rows.items()}
            for name, by_rows in times.items()}
    cpu = {name: {r: round(statistics.median(t[1] for t in ts) * 1000, 2) for r, ts in by_rows.items()}
           for name, by_rows in times.items()}
    qbytes = sum(linear.nbytes for layer in quant for linear in layer)
    print(json.dumps({"layers": args.layers, "threads": torch.get_num_threads(), "vnni": kernel.vnni,
                      "quant_weight_bytes": qbytes, "median_wall_ms": wall, "median_cpu_ms": cpu}))
    for r in rows:
        cells = "   ".join(f"{name} {wall[name][r]:8.1f} ms (cpu {cpu[name][r]:8.1f})" for name in engines)
        print(f"rows {r:>4}: {cells}")


if __name__ == "__main__":
    main()
