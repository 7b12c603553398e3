"""Our LC decoding with the kernels built for one instruction set, against llama.cpp built for the
same one, in the same run, on the same GGUF and prompt.

    python -m bench.isa [--isas avx2] [--context 4096] [--new-tokens 64] [--runs 3]
                        [--llama-cpp ~/.cache/rapidqa/peers/llama.cpp-avx2/bin]

Each of our rows runs in a worker process started with RAPIDQA_KERNEL_ISA=<isa> (both kernels are
built for it; `avx2` is what most laptop CPUs run): it loads the quantized target, prefills the
prompt once, then on each request decodes --new-tokens tokens greedily after it (one forward per
token, no stop at end-of-text, as llama-completion --ignore-eos does) and reports tokens/s. Runs
alternate between the rows (ours, llama.cpp, ours, ...) so a busy shared host slows them alike;
medians are reported. The workers' tokens must agree: every build of the kernels gives the same bits.
llama.cpp for AVX2 only: `make peers-avx2`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
QUESTION = ("How does read.fwf read a file in fixed width format, what do its widths and sep arguments do, "
            "and what happens to the data on the way?")


def _prompt_tokens(loaded, context: int) -> list[int]:  # loaded: a decoding.loaded_model.LoadedModel
    """About `context` tokens of data/R-data.pdf around the demo answer, as a question prompt."""
    from app.reexports import read_document

    pages = [page.text for page in read_document(REPO / "data" / "R-data.pdf", 50_000_000)]
    ids = loaded.encode("\n\n".join(pages))
    answer_at = len(loaded.encode("\n\n".join(pages[:14])))
    start = max(0, min(answer_at - context // 2, len(ids) - context))
    return loaded.prompt(loaded.decode(ids[start : start + context]), QUESTION).tokens


def worker(model_dir: Path, context: int, new_tokens: int, prompt_out: Path) -> None:
    """Serve decode runs over stdin/stdout: one JSON line per "run" line."""
    import torch

    from app.reexports import engine_description, load_model

    loaded = load_model("target", model_dir, torch.bfloat16, torch.device("cpu"), quantized=True)
    tokens = _prompt_tokens(loaded, context)
    prompt_out.write_text(loaded.tokenizer.decode(tokens, skip_special_tokens=False))
    model = loaded.model
    cache = model.new_cache(len(tokens) + new_tokens + 1)
    logits = model.prefill(torch.tensor(tokens), cache)
    print(json.dumps({"ready": True, "prompt_tokens": len(tokens), "engine": engine_description(loaded)}), flush=True)
    for line in sys.stdin:
        if line.strip() != "run":
            break
        cache.crop(len(tokens))
        step, out = logits, []
        start = time.perf_counter()
        for _ in range(new_tokens):
            out.append(int(step.argmax()))
            step = model.forward(torch.tensor(out[-1:]), cache)
        seconds = time.perf_counter() - start
        print(json.dumps({"tokens_per_s": new_tokens / seconds, "tokens": out}), flush=True)


class Worker:
    def __init__(self, isa: str, args: argparse.Namespace, prompt_out: Path) -> None:
        env = dict(os.environ, RAPIDQA_KERNEL_ISA=isa)
        command = [sys.executable, "-m", "bench.isa", "--worker", "--model-dir", str(args.model_dir), "--context",
                   str(args.context), "--new-tokens", str(args.new_tokens), "--prompt-out", str(prompt_out)]
        self.process = subprocess.Popen(command, cwd=REPO, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        text=True)
        self.ready = self._read()

    def _read(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the worker exited ({self.process.wait()})")
        return json.loads(line)

    def run(self) -> dict:
        self.process.stdin.write("run\n")
        self.process.stdin.flush()
        return self._read()

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait()


def main(argv: list[str] | None = None) -> int:
    from app.config import Settings

    parser = argparse.ArgumentParser(prog="python -m bench.isa", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--isas", default="avx2", help="our kernel builds to time (avx2, native, portable)")
    parser.add_argument("--context", type=int, default=4096, help="document tokens in the prompt")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--model-dir", type=Path, default=Settings().models_dir / "qwen2.5-coder-1.5b")
    home = Path(os.environ.get("RAPIDQA_HOME") or Path.home() / ".cache" / "rapidqa")
    parser.add_argument("--llama-cpp", type=Path, default=home / "peers" / "llama.cpp-avx2" / "bin",
                        help="llama.cpp tools built for the same instruction set (make peers-avx2)")
    parser.add_argument("--threads", type=int, default=None, help="threads for both (default: torch's)")
    parser.add_argument("--out", type=Path, default=REPO / "artifacts" / "bench_isa.json")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--prompt-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.model_dir, args.context, args.new_tokens, args.prompt_out)
        return 0

    import torch

    from app.machine import machine_summary
    from bench.peers import LlamaCpp, plain_decode

    threads = args.threads or torch.get_num_threads()
    os.environ["OMP_NUM_THREADS"] = str(threads)  # the workers' torch threads
    peer = LlamaCpp(args.llama_cpp, threads) if (args.llama_cpp / "llama-completion").exists() else None
    if peer is None:
        print(f"no llama-completion in {args.llama_cpp} (make peers-avx2): its row is left out")
    rows: dict[str, list[float]] = {}
    report: dict[str, object] = {"machine": machine_summary("cpu"), "threads": threads, "context": args.context,
                                 "new_tokens": args.new_tokens, "runs": args.runs, "engines": {}}
    with tempfile.TemporaryDirectory() as tmp:
        prompt_file = Path(tmp) / "prompt.txt"
        workers = {isa: Worker(isa, args, prompt_file) for isa in args.isas.split(",")}
        for isa, w in workers.items():
            report["engines"][f"ours {isa}"] = w.ready["engine"]
            report["prompt_tokens"] = w.ready["prompt_tokens"]
        tokens: dict[str, list[int]] = {}
        for run in range(args.runs):
            for isa, w in workers.items():
                result = w.run()
                rows.setdefault(f"ours LC, kernels {isa}", []).append(result["tokens_per_s"])
                tokens[isa] = result["tokens"]
            if peer is not None:
                peer_row = plain_decode(peer, args.model_dir / "model.gguf", prompt_file, args.new_tokens)
                rows.setdefault(f"llama.cpp ({args.llama_cpp.parent.name})", []).append(peer_row["tokens_per_s"])
                report["llama_cpp_prompt_tokens"] = peer_row["prompt_tokens"]
            print(f"run {run + 1}: " + ", ".join(f"{name} {values[-1]:.2f}" for name, values in rows.items()),
                  flush=True)
        for w in workers.values():
            w.close()
    # every build of our kernels gives the same bits, so their tokens must agree (None: one build ran)
    report["same_tokens"] = len({tuple(t) for t in tokens.values()}) == 1 if len(tokens) > 1 else None
    report["tokens_per_s"] = {name: {"median": statistics.median(v), "runs": v} for name, v in rows.items()}
    print(f"\n{report['prompt_tokens']} prompt tokens, {args.new_tokens} new, {threads} threads, "
          f"median of {args.runs} interleaved runs:")
    for name, values in rows.items():
        print(f"  {name:32s} {statistics.median(values):7.2f} tokens/s")
    if report["same_tokens"] is not None:
        print(f"our builds gave the same tokens: {report['same_tokens']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
