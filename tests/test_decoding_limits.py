"""Settings and model configurations the exact decoding path cannot take are refused or bounded."""

from __future__ import annotations

import pytest

from decoding.attention import SMALL_T
from decoding.generate import generate, run_to_end
from decoding.prefill import PrefixCacheHooks
from decoding.settings import MAX_GAMMA, DecodingSettings, SettingsError
from decoding.stats import Stats
from decoding.transformer import ModelArgs
from tests.tiny import random_prompt, tiny_model

QWEN_LIKE = {"model_type": "qwen2", "vocab_size": 100, "hidden_size": 64, "num_hidden_layers": 1,
             "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128,
             "max_position_embeddings": 32768}


def test_gamma_beyond_the_exact_path_is_refused() -> None:
    assert MAX_GAMMA + 1 <= SMALL_T  # a verify pass stays on the row-independent attention path
    DecodingSettings(gamma=MAX_GAMMA).validate()
    for gamma in (0, MAX_GAMMA + 1, 40):
        with pytest.raises(SettingsError, match="gamma"):
            DecodingSettings(gamma=gamma).validate()


def test_sliding_window_models_read_no_more_than_their_window() -> None:
    mistral = QWEN_LIKE | {"model_type": "mistral", "sliding_window": 4096}
    assert ModelArgs.from_hf_config(mistral).max_positions == 4096
    qwen_declared_unused = QWEN_LIKE | {"sliding_window": 4096, "use_sliding_window": False}
    assert ModelArgs.from_hf_config(qwen_declared_unused).max_positions == 32768
    qwen_used = QWEN_LIKE | {"sliding_window": 4096, "use_sliding_window": True}
    assert ModelArgs.from_hf_config(qwen_used).max_positions == 4096
    assert ModelArgs.from_hf_config(QWEN_LIKE | {"sliding_window": None}).max_positions == 32768


def test_decode_speed_leaves_out_the_prefill_token() -> None:
    """The first token comes from the prefill: 5 tokens in 2 s of decoding is 4 tokens / 2 s."""
    assert Stats("lc", generated=5, decode_s=2.0).decode_tokens_per_s == 2.0
    assert Stats("lc", generated=1, decode_s=0.5).decode_tokens_per_s is None


def test_a_prefix_cache_hit_allocates_no_cache(monkeypatch) -> None:
    """A restored prefix comes with room for the answer: no full-size cache is built and dropped."""
    target = tiny_model(1)
    prompt = random_prompt(200, seed=1)
    settings = DecodingSettings(method="lc", max_new_tokens=8)
    stored: dict[str, object] = {}

    def load(model, prefix, capacity):
        cache = stored.get("cache")
        if cache is None:
            return None
        cache.crop(len(prefix))
        cache.reserve(capacity - len(prefix))
        return cache

    hooks = PrefixCacheHooks(load=load, save=lambda model, prefix, cache: stored.update(cache=cache.clone()))
    first = run_to_end(generate("lc", target, None, prompt, None, settings, hooks))
    allocations: list[int] = []
    real_new_cache = target.model.new_cache
    monkeypatch.setattr(target.model, "new_cache", lambda capacity: allocations.append(capacity) or
                        real_new_cache(capacity))
    second = run_to_end(generate("lc", target, None, prompt, None, settings, hooks))
    assert second.stats.prefix_cached_tokens == len(prompt.prefix)
    assert second.token_ids == first.token_ids
    assert allocations == []

