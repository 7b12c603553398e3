"""The floor under attention's time on this machine: the cores' rate of 512-bit dot products, and
what it allows for a prefill chunk's attention with each K/V form.

    python -m bench.dot_rate [--threads 2] [--depths 16384,28672] [--chunk 1024]

A row-key pair (one query row against one key) of head_dim 128 costs, in dot-product instructions:
bf16 K/V, vdpbf16ps for Q.K and for the value sum: 4 + 4; the 8-bit cache, vpdpbusd for Q.K and
vdpbf16ps for the value sum: 2 + 4; both in 8-bit integers: 2 + 2. Measured rates times the chunk's
row-key pairs give each form's floor, to set beside `python -m bench.prefill_depth`'s attention
seconds: a kernel near its floor can only get faster by doing fewer or wider dot products.
"""

from __future__ import annotations

import argparse
import ctypes
from collections.abc import Sequence
from pathlib import Path

from app.reexports import KernelUnavailable, build_library, kernel_cache_dir, kernel_flags

SOURCE = Path(__file__).with_name("kernels") / "dot_rate.c"
# Qwen2.5-1.5B: 12 query heads of 128 over 28 layers
HEADS, HEAD_DIM, LAYERS = 12, 128, 28
# dot-product instructions per row-key pair and head_dim 128: (vpdpbusd, vdpbf16ps)
FORMS = {"bf16 K/V": (0, 8), "8-bit K/V (int8 Q.K, bf16 value sum)": (2, 4), "8-bit, int8 value sum too": (4, 0)}


def rates(threads: int, steps: int = 20_000_000) -> tuple[float, float]:
    """(vpdpbusd, vdpbf16ps) instructions per second over `threads` threads."""
    # the kernels' own flags for this CPU: the probe needs the instructions they would take
    library = ctypes.CDLL(str(build_library(SOURCE, kernel_flags("native"), kernel_cache_dir(), "dot_rate")))
    library.rq_dot_rate.restype = ctypes.c_double
    library.rq_dot_rate.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int, ctypes.POINTER(ctypes.c_double)]
    sink = ctypes.c_double()
    library.rq_dot_rate(0, steps // 10, threads, ctypes.byref(sink))  # warm the cores' clocks
    return (library.rq_dot_rate(0, steps, threads, ctypes.byref(sink)),
            library.rq_dot_rate(1, steps, threads, ctypes.byref(sink)))


def row_key_pairs(depth: int, chunk: int) -> int:
    """Query rows times the keys each reads (causal: the chunk's token i reads depth + i + 1), all layers."""
    return HEADS * LAYERS * (chunk * depth + chunk * (chunk + 1) // 2)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.dot_rate", description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--depths", default="16384,28672")
    parser.add_argument("--chunk", type=int, default=1024)
    args = parser.parse_args(argv)
    try:
        int8_rate, bf16_rate = rates(args.threads)
    except KernelUnavailable as error:
        raise SystemExit(f"needs AVX512-VNNI and AVX512-BF16 and a C compiler: {error}") from None
    print(f"{args.threads} threads: vpdpbusd {int8_rate / 1e9:.2f} G/s, vdpbf16ps {bf16_rate / 1e9:.2f} G/s")
    print(f"attention floor of a {args.chunk}-token prefill chunk, Qwen2.5-1.5B shape (s)")
    depths = [int(d) for d in args.depths.split(",")]
    print("| form | " + " | ".join(f"depth {d}" for d in depths) + " |")
    print("|---|" + "---:|" * len(depths))
    for form, (int8_ops, bf16_ops) in FORMS.items():
        floors = [row_key_pairs(d, args.chunk) * (int8_ops / int8_rate + bf16_ops / bf16_rate) for d in depths]
        print(f"| {form} | " + " | ".join(f"{s:.2f}" for s in floors) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
