"""The real embedded models (default pair: Qwen2.5-Coder-1.5B target, 0.5B drafter), end to end.

Greedy, eta = 0: every speculative method must return exactly LC's tokens, from scratch and with
the target's document prefix restored from the prefix cache (memory and disk).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from decoding.generate import generate, run_to_end
from decoding.loaded_model import LoadedModel
from decoding.loading import load_model
from decoding.prefix_cache import PrefixCache
from decoding.settings import DecodingSettings
from tests.docs import page_text

pytestmark = pytest.mark.real_models
QUESTION = "Which R function reads files in fixed width format, and what does it need to be told?"


@pytest.fixture(scope="module")
def target(large_model_dir: Path) -> LoadedModel:
    return load_model("1.5b", large_model_dir, torch.bfloat16, torch.device("cpu"))


@pytest.fixture(scope="module")
def drafter(small_model_dir: Path) -> LoadedModel:
    return load_model("0.5b", small_model_dir, torch.bfloat16, torch.device("cpu"))


def _contexts(target: LoadedModel, n_tokens: int) -> tuple[str, str]:
    ids = target.encode(page_text([14, 15, 16, 17]))
    assert len(ids) >= n_tokens
    long_text = target.decode(ids[:n_tokens])
    rag_text = target.decode(ids[n_tokens // 3 : n_tokens // 3 + 200])
    return long_text, rag_text


# The second turn of a conversation: the earlier exchange follows the documents in both prompts.
HISTORY = [("Which R function reads data in the format of the S language?", "The function data.restore.")]


# 1300 crosses a prefill chunk boundary; a follow-up question carries the conversation before it.
@pytest.mark.parametrize(("n_tokens", "history"), [(300, []), (1300, []), (300, HISTORY)],
                         ids=["300", "1300", "300-second-turn"])
def test_every_method_returns_lc_tokens(target: LoadedModel, drafter: LoadedModel, tmp_path: Path,
                                        n_tokens: int, history: list[tuple[str, str]]) -> None:
    long_text, rag_text = _contexts(target, n_tokens)
    long_prompt = target.prompt(long_text, QUESTION, history)
    rag_prompt = target.prompt(rag_text, QUESTION, history)
    assert long_prompt.prefix == target.prompt(long_text, QUESTION).prefix  # the document prefix is unchanged
    settings = DecodingSettings(max_new_tokens=24, gamma=5, eta=0.0, magicdec_window=128)
    cache = PrefixCache(tmp_path, {})

    lc = run_to_end(generate("lc", target, drafter, long_prompt, rag_prompt, settings, cache.hooks()))
    assert lc.stats.prefix_cached_tokens == 0  # computed from scratch, then stored
    assert lc.stats.generated > 5
    rejected = 0
    # A focus drafter keeps the target's slots of the passage the RAG drafter reads.
    passage = long_prompt.boundaries[0] + 1 + n_tokens // 3
    focus = [(passage, passage + 200)]
    for method in ("sd", "magicdec", "lookup", "rapid", "rapid-focus"):
        out = run_to_end(generate(method, target, drafter, long_prompt, rag_prompt, settings, cache.hooks(),
                                  passage_spans=focus))
        assert out.token_ids == lc.token_ids, method
        assert out.stats.prefix_cached_tokens == len(long_prompt.prefix)
        assert out.stats.drafted > 0 and out.stats.accepted > 0, method  # every drafter drafted and was right
        rejected += out.stats.drafted - out.stats.accepted
    assert rejected > 0  # and some drafts were wrong, so the exact comparison saw the replacement path

    # A new process: the prefix comes from disk, and answers stay token-identical.
    reopened = PrefixCache(tmp_path, {})
    for method in ("lc", "rapid"):
        out = run_to_end(generate(method, target, drafter, long_prompt, rag_prompt, settings, reopened.hooks()))
        assert out.stats.prefix_cached_tokens == len(long_prompt.prefix)
        assert out.token_ids == lc.token_ids, method
