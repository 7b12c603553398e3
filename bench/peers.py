"""The CPU peer, llama.cpp, measured on the same GGUF files and the same prompt in the same run.

llama.cpp's tools are built from the source that the `llama-cpp-python` package on PyPI vendors
(`make peers`; never part of `make demo` or `make test`). Three rows per context:
  "llama.cpp"        plain greedy decoding (llama-completion)
  "llama.cpp draft"  its speculative decoding with our drafter's GGUF as draft model
  "llama.cpp ngram"  its n-gram (prompt lookup) speculation
Each tool reads the prompt as text with special tokens parsed, which gives back our prompt tokens
(the Qwen tokenizers add no BOS); the token count each tool reports is kept beside its speed.
Each row comes per KV cache type (PEER_CACHES): llama.cpp's default f16 cache, and Q8_0 keys and
values ("llama.cpp q8_0" ...), the peer of our 8-bit KV cache.

Prefill at depth (bench.prefill_depth) is timed by llama-bench: one batch of new tokens after
`depth` tokens already in the cache, per cache type.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

TOOLS = ("llama-completion", "llama-speculative-simple")
PEER_TIMEOUT_S = 3600
PEERS = ("llama.cpp", "llama.cpp draft", "llama.cpp ngram")
BENCH_TOOL = "llama-bench"
# llama.cpp's KV cache types: its default, and Q8_0 keys and values. A quantized V cache needs
# flash attention, so the Q8_0 rows turn it on; the f16 rows keep llama.cpp's default (auto).
PEER_CACHES = ("f16", "q8_0")
CACHE_FLAGS: dict[str, tuple[str, ...]] = {"f16": (), "q8_0": ("-ctk", "q8_0", "-ctv", "q8_0", "-fa", "1")}
# the draft model's cache (llama-speculative-simple), the same type as the target's
DRAFT_CACHE_FLAGS: dict[str, tuple[str, ...]] = {"f16": (), "q8_0": ("-ctkd", "q8_0", "-ctvd", "q8_0")}


@dataclass(frozen=True)
class LlamaCpp:
    bin_dir: Path
    threads: int

    def tool(self, name: str) -> str:
        return str(self.bin_dir / name)


def llama_cpp_bin_dir(home: Path) -> Path:
    """Where `make peers` puts llama.cpp's tools: RAPIDQA_LLAMA_CPP_BIN, else $RAPIDQA_HOME/peers/llama.cpp/bin."""
    configured = os.environ.get("RAPIDQA_LLAMA_CPP_BIN")
    return Path(configured) if configured else home / "peers" / "llama.cpp" / "bin"


def find_llama_cpp(home: Path, threads: int) -> LlamaCpp | None:
    """The built tools (llama_cpp_bin_dir), or None."""
    bin_dir = llama_cpp_bin_dir(home)
    if all((bin_dir / tool).exists() for tool in TOOLS):
        return LlamaCpp(bin_dir, threads)
    return None


def find_llama_bench(home: Path, threads: int) -> LlamaCpp | None:
    """llama-bench in llama_cpp_bin_dir (`make peers` builds it), or None."""
    bin_dir = llama_cpp_bin_dir(home)
    return LlamaCpp(bin_dir, threads) if (bin_dir / BENCH_TOOL).exists() else None


def peer_name(peer: str, cache: str) -> str:
    """A row's name: the peer's for the default f16 cache, with the cache type otherwise."""
    if cache not in PEER_CACHES:
        raise ValueError(f"unknown llama.cpp cache type {cache!r}; choose from {', '.join(PEER_CACHES)}")
    return peer if cache == "f16" else f"{peer} {cache}"


def _run(command: list[str]) -> str:
    done = subprocess.run(command, capture_output=True, text=True, timeout=PEER_TIMEOUT_S, check=False)
    output = done.stdout + done.stderr
    if done.returncode != 0:
        raise RuntimeError(f"{Path(command[0]).name} failed ({done.returncode}): {output[-2000:]}")
    return output


def _number(pattern: str, text: str) -> float:
    match = re.search(pattern, text)
    if match is None:
        raise RuntimeError(f"llama.cpp output has no {pattern!r}: {text[-2000:]}")
    return float(match.group(1))


def plain_decode(peer: LlamaCpp, model: Path, prompt_file: Path, new_tokens: int,
                 cache: str = "f16") -> dict[str, float]:
    """Greedy decoding of new_tokens after the prompt; speeds from llama.cpp's own timings."""
    out = _run(plain_decode_command(peer, model, prompt_file, new_tokens, cache))
    return {
        "tokens_per_s": _eval_speed(out),
        "prompt_tokens": _number(r"prompt eval time =\s*[\d.]+ ms /\s*(\d+) tokens", out),
        "prompt_tokens_per_s": _number(r"prompt eval time =.*?([\d.]+) tokens per second", out),
    }


def plain_decode_command(peer: LlamaCpp, model: Path, prompt_file: Path, new_tokens: int, cache: str) -> list[str]:
    return [peer.tool("llama-completion"), "-m", str(model), "-f", str(prompt_file), "-n", str(new_tokens),
            "--temp", "0", "-t", str(peer.threads), "-c", "0", "-no-cnv", "--ignore-eos", "--no-warmup",
            *CACHE_FLAGS[cache]]


def _eval_speed(out: str) -> float:
    # "eval time = X ms / N runs ( ... ms per token, S tokens per second)": the line after the prompt's
    for line in out.splitlines():
        if "eval time" in line and "prompt eval" not in line:
            return _number(r"([\d.]+) tokens per second", line)
    raise RuntimeError(f"llama.cpp output has no eval time: {out[-2000:]}")


def speculative_decode(peer: LlamaCpp, model: Path, draft_model: Path | None, prompt_file: Path, new_tokens: int,
                       gamma: int, prompt_tokens: int, cache: str = "f16") -> dict[str, float]:
    """llama-speculative-simple: with a draft model (draft-simple) or n-gram lookup (ngram-simple)."""
    out = _run(speculative_command(peer, model, draft_model, prompt_file, new_tokens, gamma, prompt_tokens, cache))
    drafted = _number(r"n_drafted\s*=\s*(\d+)", out)
    return {
        "tokens_per_s": _number(r"decoded\s+\d+ tokens in\s+[\d.]+ seconds, speed:\s+([\d.]+) t/s", out),
        "prompt_tokens": _number(r"encoded\s+(\d+) tokens", out),
        "drafted": drafted,
        "acceptance_rate": _number(r"n_accept\s*=\s*(\d+)", out) / drafted if drafted else None,
    }


def speculative_command(peer: LlamaCpp, model: Path, draft_model: Path | None, prompt_file: Path, new_tokens: int,
                        gamma: int, prompt_tokens: int, cache: str) -> list[str]:
    command = [peer.tool("llama-speculative-simple"), "-m", str(model), "-f", str(prompt_file),
               "-n", str(new_tokens), "--temp", "0", "-t", str(peer.threads), "-c", "0",
               # the tool reads the whole prompt as one batch: the batch must hold it
               "-b", str(prompt_tokens + 64), "-ub", "512", "--spec-draft-n-max", str(gamma)]
    if draft_model is not None:
        command += ["-md", str(draft_model), "--spec-type", "draft-simple"]
    else:
        command += ["-md", str(model), "--spec-type", "ngram-simple"]  # the tool wants a draft model argument
    return [*command, *CACHE_FLAGS[cache], *DRAFT_CACHE_FLAGS[cache]]


def measure_peers(peer: LlamaCpp, target_gguf: Path, drafter_gguf: Path, prompt_text: str, prompt_tokens: int,
                  new_tokens: int, gamma: int, which: tuple[str, ...] = PEERS,
                  caches: tuple[str, ...] = ("f16",)) -> dict[str, dict[str, float | None]]:
    """One run of each peer per cache type on the same prompt text (rows peer_name(peer, cache), a
    peer's cache types side by side); a failed run reports its error, the others go on."""
    results: dict[str, dict[str, float | None]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        prompt_file = Path(tmp) / "prompt.txt"
        prompt_file.write_text(prompt_text)
        runs = {
            "llama.cpp": lambda cache: plain_decode(peer, target_gguf, prompt_file, new_tokens, cache),
            "llama.cpp draft": lambda cache: speculative_decode(peer, target_gguf, drafter_gguf, prompt_file,
                                                                new_tokens, gamma, prompt_tokens, cache),
            "llama.cpp ngram": lambda cache: speculative_decode(peer, target_gguf, None, prompt_file, new_tokens,
                                                                gamma, prompt_tokens, cache),
        }
        for name in which:
            for cache in caches:
                try:
                    results[peer_name(name, cache)] = runs[name](cache)
                except (RuntimeError, subprocess.TimeoutExpired) as error:
                    results[peer_name(name, cache)] = {"tokens_per_s": None, "error": str(error)[-800:]}  # type: ignore[dict-item]
    return results


def llama_bench_command(peer: LlamaCpp, model: Path, chunk: int, depth: int, cache: str, runs: int) -> list[str]:
    """llama-bench timing one batch of `chunk` new tokens after `depth` cached ones, `runs` times
    (it fills the depth once per call and restores it before each run)."""
    return [peer.tool(BENCH_TOOL), "-m", str(model), "-p", str(chunk), "-n", "0", "-d", str(depth),
            # the chunk as one batch, as our prefill runs it
            "-b", str(chunk), "-ub", str(chunk), "-r", str(runs), "-t", str(peer.threads), "-o", "json",
            *CACHE_FLAGS[cache]]


def prefill_at_depth(peer: LlamaCpp, model: Path, chunk: int, depth: int, cache: str, runs: int) -> dict[str, object]:
    """llama-bench's median seconds for the chunk at this depth with this cache type."""
    command = llama_bench_command(peer, model, chunk, depth, cache, runs)
    done = subprocess.run(command, capture_output=True, text=True, timeout=PEER_TIMEOUT_S, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{BENCH_TOOL} failed ({done.returncode}): {(done.stdout + done.stderr)[-2000:]}")
    return parse_llama_bench(done.stdout, chunk, depth)


def parse_llama_bench(stdout: str, chunk: int, depth: int) -> dict[str, object]:
    """llama-bench's JSON (-o json) for one prompt test -> the row's figures."""
    try:
        tests = json.loads(stdout)
    except json.JSONDecodeError as error:
        raise RuntimeError(f"{BENCH_TOOL} printed no JSON ({error}): {stdout[-2000:]}") from None
    if len(tests) != 1 or tests[0].get("n_prompt") != chunk or tests[0].get("n_depth") != depth:
        raise RuntimeError(f"{BENCH_TOOL} did not report one test of {chunk} tokens at depth {depth}: {stdout[-2000:]}")
    test = tests[0]
    chunk_s = statistics.median(test["samples_ns"]) / 1e9
    return {"chunk_s": chunk_s, "tokens_per_s": chunk / chunk_s, "runs": len(test["samples_ns"]),
            "type_k": test["type_k"], "type_v": test["type_v"], "flash_attn": test["flash_attn"]}
