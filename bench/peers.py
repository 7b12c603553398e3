"""The CPU peer, llama.cpp, measured on the same GGUF files and the same prompt in the same run.

llama.cpp's tools are built from the source that the `llama-cpp-python` package on PyPI vendors
(`make peers`; never part of `make demo` or `make test`). Three rows per context:
  "llama.cpp"        plain greedy decoding (llama-completion)
  "llama.cpp draft"  its speculative decoding with our drafter's GGUF as draft model
  "llama.cpp ngram"  its n-gram (prompt lookup) speculation
Each tool reads the prompt as text with special tokens parsed, which gives back our prompt tokens
(the Qwen tokenizers add no BOS); the token count each tool reports is kept beside its speed.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

TOOLS = ("llama-completion", "llama-speculative-simple")
PEER_TIMEOUT_S = 3600
PEERS = ("llama.cpp", "llama.cpp draft", "llama.cpp ngram")


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


def plain_decode(peer: LlamaCpp, model: Path, prompt_file: Path, new_tokens: int) -> dict[str, float]:
    """Greedy decoding of new_tokens after the prompt; speeds from llama.cpp's own timings."""
    out = _run([peer.tool("llama-completion"), "-m", str(model), "-f", str(prompt_file), "-n", str(new_tokens),
                "--temp", "0", "-t", str(peer.threads), "-c", "0", "-no-cnv", "--ignore-eos", "--no-warmup"])
    return {
        "tokens_per_s": _eval_speed(out),
        "prompt_tokens": _number(r"prompt eval time =\s*[\d.]+ ms /\s*(\d+) tokens", out),
        "prompt_tokens_per_s": _number(r"prompt eval time =.*?([\d.]+) tokens per second", out),
    }


def _eval_speed(out: str) -> float:
    # "eval time = X ms / N runs ( ... ms per token, S tokens per second)": the line after the prompt's
    for line in out.splitlines():
        if "eval time" in line and "prompt eval" not in line:
            return _number(r"([\d.]+) tokens per second", line)
    raise RuntimeError(f"llama.cpp output has no eval time: {out[-2000:]}")


def speculative_decode(peer: LlamaCpp, model: Path, draft_model: Path | None, prompt_file: Path, new_tokens: int,
                       gamma: int, prompt_tokens: int) -> dict[str, float]:
    """llama-speculative-simple: with a draft model (draft-simple) or n-gram lookup (ngram-simple)."""
    command = [peer.tool("llama-speculative-simple"), "-m", str(model), "-f", str(prompt_file),
               "-n", str(new_tokens), "--temp", "0", "-t", str(peer.threads), "-c", "0",
               # the tool reads the whole prompt as one batch: the batch must hold it
               "-b", str(prompt_tokens + 64), "-ub", "512", "--spec-draft-n-max", str(gamma)]
    if draft_model is not None:
        command += ["-md", str(draft_model), "--spec-type", "draft-simple"]
    else:
        command += ["-md", str(model), "--spec-type", "ngram-simple"]  # the tool wants a draft model argument
    out = _run(command)
    drafted = _number(r"n_drafted\s*=\s*(\d+)", out)
    return {
        "tokens_per_s": _number(r"decoded\s+\d+ tokens in\s+[\d.]+ seconds, speed:\s+([\d.]+) t/s", out),
        "prompt_tokens": _number(r"encoded\s+(\d+) tokens", out),
        "drafted": drafted,
        "acceptance_rate": _number(r"n_accept\s*=\s*(\d+)", out) / drafted if drafted else None,
    }


def measure_peers(peer: LlamaCpp, target_gguf: Path, drafter_gguf: Path, prompt_text: str, prompt_tokens: int,
                  new_tokens: int, gamma: int, which: tuple[str, ...] = PEERS) -> dict[str, dict[str, float | None]]:
    """One run of each peer on the same prompt text; a failed peer reports its error, the others go on."""
    results: dict[str, dict[str, float | None]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        prompt_file = Path(tmp) / "prompt.txt"
        prompt_file.write_text(prompt_text)
        runs = {
            "llama.cpp": lambda: plain_decode(peer, target_gguf, prompt_file, new_tokens),
            "llama.cpp draft": lambda: speculative_decode(peer, target_gguf, drafter_gguf, prompt_file, new_tokens,
                                                          gamma, prompt_tokens),
            "llama.cpp ngram": lambda: speculative_decode(peer, target_gguf, None, prompt_file, new_tokens, gamma,
                                                          prompt_tokens),
        }
        for name in which:
            try:
                results[name] = runs[name]()
            except (RuntimeError, subprocess.TimeoutExpired) as error:
                results[name] = {"tokens_per_s": None, "error": str(error)[-800:]}  # type: ignore[dict-item]
    return results
