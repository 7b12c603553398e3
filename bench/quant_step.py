"""A real model's decode step, verify pass and prefill: quantized weights against dense bf16, same run.

Both engines load the same embedded model (the GGUF's own 4/8-bit values through the C kernel, and
the bf16 cache through prepacked oneDNN GEMMs), prefill the same prompt, then alternate a one-token
decode step and a (gamma + 1)-token verify pass on that cache (each cropped back afterwards).
Reports medians of wall-clock and process CPU time, prefill tokens/s, and the resident memory
each model added once its weights were touched.

    python -m bench.quant_step [--model qwen2.5-coder-1.5b] [--context 4096] [--rows 6] [--repeats 7]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from app.config import Settings
from app.reexports import Transformer, load_model
from app.registry import resolve_model


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def timed(fn) -> tuple[float, float]:
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-coder-1.5b")
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--rows", type=int, default=6, help="tokens in a verify pass (gamma + 1)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=0, help="torch (and kernel) threads; 0: torch's default")
    parser.add_argument("--engines", default="quantized,bf16")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    names = args.engines.split(",")
    directory = resolve_model(args.model, Settings().models_dir, dense=any(name != "quantized" for name in names))
    prompt = torch.randint(100, 20000, (args.context,), generator=torch.Generator().manual_seed(0))
    engines: dict[str, tuple[Transformer, object]] = {}
    report: dict[str, dict] = {}
    for name in names:
        before = rss_bytes()
        loaded = load_model(args.model, directory, torch.bfloat16, torch.device("cpu"), quantized=name == "quantized")
        if (loaded.weights == "quantized") != (name == "quantized"):
            raise SystemExit(f"{args.model} has no quantized weights here")
        model = loaded.model
        cache = model.new_cache(args.context + args.rows + 1)
        wall, cpu = timed(lambda m=model, c=cache: m.prefill(prompt, c))
        report[name] = {"prefill_s": round(wall, 2), "prefill_cpu_s": round(cpu, 2),
                        "prefill_tokens_per_s": round(args.context / wall, 1),
                        "rss_added_gb": round((rss_bytes() - before) / 1e9, 2), "min_rows": model.min_rows}
        engines[name] = (model, cache)
        print(name, json.dumps(report[name]), flush=True)
    steps: dict[str, dict[str, list[tuple[float, float]]]] = {n: {"decode": [], "verify": []} for n in engines}
    extra = torch.randint(100, 20000, (args.rows,), generator=torch.Generator().manual_seed(1))
    for _ in range(args.repeats):  # interleaved: both engines see the same host load
        for name, (model, cache) in engines.items():
            for kind, tokens in (("decode", extra[:1]), ("verify", extra)):
                steps[name][kind].append(timed(lambda m=model, c=cache, t=tokens: m.forward(t, c, all_logits=True)))
                cache.crop(args.context)
    for name, by_kind in steps.items():
        for kind, samples in by_kind.items():
            report[name][f"{kind}_ms"] = round(statistics.median(s[0] for s in samples) * 1000, 1)
            report[name][f"{kind}_cpu_ms"] = round(statistics.median(s[1] for s in samples) * 1000, 1)
        report[name]["verify_over_decode"] = round(report[name]["verify_ms"] / report[name]["decode_ms"], 2)
    print(json.dumps({"model": args.model, "context": args.context, "verify_rows": args.rows,
                      "threads": torch.get_num_threads(), "engines": report}, indent=1))


if __name__ == "__main__":
    main()
