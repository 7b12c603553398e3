"""Exactness of every method against LC on tiny random models (fast; no real weights)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

import decoding.attention
import decoding.generate
import decoding.transformer
from decoding.cache import KVCache
from decoding.drafters import lookup_continuation, vocabulary_head
from decoding.generate import Finished, PassStats, generate, passage_slots, run_to_end
from decoding.loaded_model import LoadedModel, Prompt
from decoding.loading import transformer_from_hf_model
from decoding.settings import MAX_GAMMA, DecodingSettings
from decoding.transformer import norm_linear
from tests.tiny import EXACT_VOCAB, random_prompt, tiny_model

SPECULATIVE = ("sd", "magicdec", "rapid", "rapid-self", "rapid-focus", "lookup")


def run(method: str, target, drafter, prompt: Prompt, rag: Prompt, passage_spans=None, **overrides) -> Finished:
    settings = DecodingSettings(method=method, **({"max_new_tokens": 40} | overrides))
    if passage_spans is None:
        passage_spans = passage_spans_of(prompt)
    return run_to_end(generate(method, target, drafter, prompt, rag, settings, passage_spans=passage_spans))


def passage_spans_of(prompt: Prompt) -> list[tuple[int, int]]:
    """A focus drafter's "retrieved passages" in a tiny prompt: two runs, half of the documents."""
    n = len(prompt.prefix)
    return [(n // 4, n // 2), (n * 5 // 8, n * 7 // 8)]


@pytest.fixture(scope="module")
def pair_fp32():
    return tiny_model(1), tiny_model(2, noise_from=1, noise=0.01)


@pytest.fixture(scope="module")
def pair_bf16():
    return tiny_model(1, torch.bfloat16), tiny_model(2, torch.bfloat16, noise_from=1, noise=0.01)


@pytest.mark.parametrize("hidden_size", [64, 256])  # head_dim 16: torch attention; 64: the C kernel
def test_engine_matches_transformers_logits(hidden_size: int) -> None:
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=300, hidden_size=hidden_size, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    hf = Qwen2ForCausalLM(config).eval()
    ours = transformer_from_hf_model(hf)
    ids = torch.randint(0, 300, (70,))
    with torch.no_grad():
        reference = hf(ids[None]).logits[0]
    cache = ours.new_cache(8)  # small on purpose: growth must keep the contents
    first, rest = ours.forward(ids[:50], cache, all_logits=True), ours.forward(ids[50:], cache, all_logits=True)
    chunked = torch.cat([first, rest])
    torch.testing.assert_close(chunked, reference, atol=1e-5, rtol=1e-5)
    cache = ours.new_cache(8)
    stepwise = torch.stack([ours.forward(ids[i : i + 1], cache) for i in range(70)])
    torch.testing.assert_close(stepwise, reference, atol=1e-5, rtol=1e-5)


# A small vocabulary makes n-grams recur, so prompt lookup finds drafts; the drafter reads the last
# three quarters of the documents and MagicDec's window drops a quarter, so every drafter agrees
# with the target often but not always. Each exactness run must show both outcomes.
EXACT_GAMMAS = (1, 3, 6, MAX_GAMMA)


def assert_drafted_and_sometimes_wrong(out: Finished, label: object) -> None:
    assert out.stats.drafted > 0 and 0 < out.stats.accepted < out.stats.drafted, (
        label, out.stats.drafted, out.stats.accepted)


def check_drafters_exact(target: LoadedModel, drafter: LoadedModel, length: int) -> None:
    """SD, MagicDec, RAPID and RAPID with the target as its own drafter (reading the passages, or its
    own cache's slots of them), at every gamma, return LC's tokens, each drafting, right and wrong."""
    prompt = random_prompt(length, seed=length, vocab=EXACT_VOCAB)
    rag = Prompt(prompt.prefix[length // 4 :], prompt.suffix)
    window = {"magicdec_window": max(4, length * 3 // 4), "magicdec_sinks": 4}
    lc = run("lc", target, drafter, prompt, rag)
    assert lc.stats.generated == 40
    for method in ("sd", "magicdec", "rapid", "rapid-self", "rapid-focus"):
        for gamma in EXACT_GAMMAS:
            out = run(method, target, drafter, prompt, rag, gamma=gamma, eta=0.0, **window)
            assert out.token_ids == lc.token_ids, (method, gamma)
            assert_drafted_and_sometimes_wrong(out, (method, gamma))


def check_lookup_exact(target: LoadedModel, length: int) -> None:
    """Prompt lookup drafts only where the answer repeats an n-gram of the prompt: exactness is checked
    on every prompt tried, until one where lookup drafted and was both accepted and rejected."""
    for seed in range(40):  # short prompts on some forms repeat little: more seeds before one that does
        prompt = random_prompt(length, seed=seed, vocab=EXACT_VOCAB)
        lc = run("lc", target, None, prompt, None)
        outs = {gamma: run("lookup", target, None, prompt, None, gamma=gamma) for gamma in EXACT_GAMMAS}
        for gamma, out in outs.items():
            assert out.token_ids == lc.token_ids, (seed, gamma)
        if all(0 < o.stats.accepted < o.stats.drafted for o in outs.values()):
            return
    pytest.fail("no prompt tried made lookup draft and be sometimes wrong")


@pytest.mark.parametrize("length", [12, 300, 1100])  # 1100 crosses a prefill chunk boundary
def test_greedy_eta0_equals_lc(small_vocab_pair, attention: str, length: int) -> None:
    check_drafters_exact(*small_vocab_pair, length)


@pytest.mark.parametrize("length", [12, 300, 1100])
def test_lookup_greedy_equals_lc(small_vocab_pair, attention: str, length: int) -> None:
    check_lookup_exact(small_vocab_pair[0], length)


def test_speculation_really_drafts(pair_fp32) -> None:
    target, drafter = pair_fp32
    prompt = random_prompt(300, seed=3)
    out = run("sd", target, drafter, prompt, prompt, gamma=4, max_new_tokens=60)
    assert out.stats.drafted > 0
    assert 0.2 < out.stats.acceptance_rate < 1.0  # both accepts and rejections are exercised
    assert out.stats.mean_accepted_length > 1.0


def test_stop_token_inside_a_block(pair_fp32) -> None:
    """A stop token accepted in the middle of a drafted block ends the answer right there."""
    target, drafter = pair_fp32
    prompt, rag = random_prompt(200, seed=11), random_prompt(40, seed=5)
    free = run("lc", target, drafter, prompt, rag).token_ids
    stop = free[17]
    first = free.index(stop)
    stopping_target = tiny_model(1, stop_ids=frozenset({stop}))
    for method in ("lc", *SPECULATIVE):
        out = run(method, stopping_target, drafter, prompt, rag, gamma=6, magicdec_window=64)
        assert out.token_ids == free[:first], method
        assert out.stats.finish_reason == "eos"


@pytest.mark.parametrize("limit", [1, 2, 7])
def test_max_new_tokens_inside_a_block(pair_fp32, limit: int) -> None:
    target, drafter = pair_fp32
    prompt = random_prompt(100, seed=1)
    lc = run("lc", target, drafter, prompt, prompt, max_new_tokens=limit)
    for method in SPECULATIVE:
        out = run(method, target, drafter, prompt, prompt, max_new_tokens=limit, gamma=5)
        assert out.token_ids == lc.token_ids and len(out.token_ids) == limit
        assert out.stats.finish_reason == "length"


def test_lookup_continuation() -> None:
    tokens = [5, 6, 7, 8, 9, 1, 2, 5, 6, 7]
    assert lookup_continuation(tokens, max_ngram=3, k=3) == [8, 9, 1]
    assert lookup_continuation([1, 2, 3], max_ngram=3, k=3) == []


def test_rapid_with_eta_still_runs_greedy(pair_fp32) -> None:
    target, drafter = pair_fp32
    prompt, rag = random_prompt(300, seed=2), random_prompt(60, seed=2)
    out = run("rapid", target, drafter, prompt, rag, eta=5.0, gamma=4)
    assert out.stats.generated == 40 and out.stats.drafted > 0


@pytest.mark.parametrize("method", ["sd", "rapid", "magicdec", "rapid-focus"])
def test_first_token_before_the_drafter_reads(pair_fp32, method: str, monkeypatch) -> None:
    """The first token needs only the target's prefill: the drafter's own prefill must not delay it."""
    target, drafter = pair_fp32
    drafter_model = target.model if method in ("magicdec", "rapid-focus") else drafter.model
    calls: list[int] = []
    real_forward = drafter_model.forward_many
    monkeypatch.setattr(drafter_model, "forward_many", lambda batch: calls.extend(len(r.tokens) for r in batch) or
                        real_forward(batch))
    prompt, rag = random_prompt(300, seed=4), random_prompt(60, seed=4)
    settings = DecodingSettings(method=method, max_new_tokens=20)
    events = generate(method, target, drafter, prompt, rag, settings, passage_spans=passage_spans_of(prompt))
    first_pass = next(e for e in events if isinstance(e, PassStats))
    assert first_pass.stats.generated == 1
    if method not in ("magicdec", "rapid-focus"):  # there the drafter is the target, which did prefill
        assert calls == []
    calls_at_first_token = len(calls)
    finished = run_to_end(events)
    assert len(calls) > calls_at_first_token and finished.stats.drafted > 0
    if method == "rapid-focus":  # nothing to read: its first call drafts on the first answer token
        assert calls[calls_at_first_token] == 1
    assert 0 < finished.stats.first_token_s <= finished.stats.prefill_s + finished.stats.decode_s
    # The second token waits for the drafter's read and one draft-and-verify round, both timed.
    assert 0 < finished.stats.second_token_s <= finished.stats.prefill_s + finished.stats.decode_s


def test_focus_slots_keep_the_header_and_the_passages() -> None:
    prompt = Prompt(list(range(100)), [100, 101, 102], (10, 60))  # header 0..9, pieces 10..59 and 60..99
    spans = [(70, 80), (5, 20), (18, 30), (95, 120)]  # out of order, overlapping, in the header, past the end
    assert passage_slots(prompt, spans) == [(0, 30), (70, 80), (95, 100)]
    assert passage_slots(prompt, []) == [(0, 10)]
    assert passage_slots(Prompt(list(range(20)), [20]), [(3, 9)]) == [(0, 20)]  # no pieces: all is header


def test_a_gathered_cache_keeps_true_positions(pair_fp32) -> None:
    """Gathering every slot gives the full cache's logits (positions survive the copy); dropping slots
    changes them (the drafter really reads less)."""
    model = pair_fp32[0].model
    ids = torch.randint(0, 256, (50,), generator=torch.Generator().manual_seed(3))
    full = model.new_cache(64)
    model.prefill(ids[:49], full)
    every = KVCache.gather(full, [(0, 20), (20, 49)], spare=4, next_position=49)
    some = KVCache.gather(full, [(0, 10), (30, 49)], spare=4, next_position=49)
    assert every.next_position == some.next_position == 49 and some.length == 29
    reference = model.forward(ids[49:], full.clone())
    torch.testing.assert_close(model.forward(ids[49:], every), reference, rtol=0, atol=0)
    assert not torch.allclose(model.forward(ids[49:], some), reference)
    with pytest.raises(ValueError):
        KVCache.gather(full, [(0, 10)], spare=4, next_position=5)


def test_vocabulary_head_scores_only_its_tokens(pair_fp32) -> None:
    from tests.test_quant_linear import quantized

    for loaded in (pair_fp32[0], quantized(pair_fp32[0])):
        model = loaded.model
        x = torch.randn(3, model.args.dim, generator=torch.Generator().manual_seed(0)).to(model.dtype)
        tokens = [200, 7, 31, 7, 150]
        head = vocabulary_head(model, tokens)
        assert head is not None
        full = norm_linear(model.norm, model.lm_head, x).float()
        restricted = norm_linear(model.norm, head, x)
        ids = torch.tensor(sorted(set(tokens)))
        # The quantized kernel rounds its inputs to 8 bits; the dense rows take them as they are.
        tolerance = 0.05 * float(full.abs().max()) if model.quantized else 1e-4
        torch.testing.assert_close(restricted[:, ids], full[:, ids], rtol=0, atol=tolerance)
        others = torch.ones(model.args.vocab_size, dtype=torch.bool)
        others[ids] = False
        assert torch.isinf(restricted[:, others]).all()
        head.add([9, 7])  # a token the answer brought joins; one already in stays once
        grown = norm_linear(model.norm, head, x)
        assert len(head.ids) == len(ids) + 1
        torch.testing.assert_close(grown[:, [7, 9]], full[:, [7, 9]], rtol=0, atol=tolerance)
    assert vocabulary_head(pair_fp32[0].model, range(200)) is None  # most of the vocabulary: not worth it


def test_drafting_over_the_prompts_vocabulary_stays_exact(pair_fp32) -> None:
    """Drafters score only the prompts' tokens by default; exactness holds either way."""
    target, drafter = pair_fp32
    prompt, rag = random_prompt(60, seed=8), random_prompt(30, seed=9)
    lc = run("lc", target, drafter, prompt, rag)
    for method in ("rapid", "sd", "rapid-focus"):
        narrow = run(method, target, drafter, prompt, rag, gamma=4)
        wide = run(method, target, drafter, prompt, rag, gamma=4, draft_vocabulary=False)
        assert narrow.token_ids == wide.token_ids == lc.token_ids, method
        assert narrow.stats.drafted > 0 and wide.stats.drafted > 0


def test_decode_seconds_exclude_the_consumers_time_between_tokens(pair_fp32, monkeypatch) -> None:
    """#28.4: the UI renders at every yield; that time counted as decoding and understated tokens/s.

    A fake clock that only the consumer moves (10 s per event) makes this exact on a busy machine:
    the engine's own work takes no time on it, so every second counted is the consumer's.
    """
    clock = [0.0]
    monkeypatch.setattr(decoding.generate, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    target, drafter = pair_fp32
    prompt = random_prompt(200, seed=5)
    settings = DecodingSettings(method="rapid", gamma=3, max_new_tokens=16)
    finished, events = None, 0
    for event in generate("rapid", target, drafter, prompt, prompt, settings):
        if isinstance(event, Finished):
            finished = event
        else:
            clock[0] += 10.0  # a slow consumer: the UI rendering chat and plot
            events += 1
    assert finished is not None and events > 4 and finished.stats.generated > 4
    stats = finished.stats
    assert stats.decode_s == 0.0 and stats.second_token_s == 0.0 and stats.prefill_s == 0.0
    assert stats.token_times == [0.0] * stats.generated
