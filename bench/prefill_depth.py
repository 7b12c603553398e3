"""Where a prefill chunk's time goes as the context grows: the whole forward and attention alone.

    python -m bench.prefill_depth [--depths 0,16384,28672] [--chunk 1024] [--model qwen2.5-coder-1.5b]

One chunk of new tokens is run at each depth over a cache whose first `depth` slots stand for an
already-read prefix (their contents do not change the cost). Attention is timed by wrapping the
attention function the model calls, so the rest is the weights' GEMMs, norms and RoPE.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from app.config import Settings
from app.reexports import PREFILL_CHUNK, load_model
from app.reexports import transformer_module as model_module
from app.registry import resolve_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-coder-1.5b")
    parser.add_argument("--depths", default="0,16384,28672")
    parser.add_argument("--chunk", type=int, default=PREFILL_CHUNK)
    args = parser.parse_args()
    depths = [int(d) for d in args.depths.split(",")]
    loaded = load_model(args.model, resolve_model(args.model, Settings().models_dir), torch.bfloat16,
                        torch.device("cpu"), quantized=True)
    model = loaded.model
    in_attention = [0.0]
    real_attention_for = model_module.attention_for

    def timed_attention_for(device: torch.device):  # type: ignore[no-untyped-def]
        attend = real_attention_for(device)

        def timed(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n: int) -> torch.Tensor:
            start = time.perf_counter()
            out = attend(q, k, v, n)
            in_attention[0] += time.perf_counter() - start
            return out

        return timed

    model_module.attention_for = timed_attention_for
    cache = model.new_cache(max(depths) + args.chunk)
    tokens = torch.randint(100, 20000, (args.chunk,), generator=torch.Generator().manual_seed(0))
    rows = []
    for depth in depths:
        cache.length = cache.next_position = depth
        in_attention[0] = 0.0
        start = time.perf_counter()
        model.forward(tokens, cache)
        total = time.perf_counter() - start
        rows.append({"depth": depth, "chunk_s": round(total, 2), "attention_s": round(in_attention[0], 2),
                     "tokens_per_s": round(args.chunk / total, 1)})
        print(f"depth {depth:6d}: {total:6.2f} s per {args.chunk}-token chunk, attention {in_attention[0]:6.2f} s, "
              f"{args.chunk / total:6.1f} tokens/s", flush=True)
    print(json.dumps({"model": args.model, "threads": torch.get_num_threads(), "rows": rows}))


if __name__ == "__main__":
    main()
