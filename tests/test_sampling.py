"""The retrieval-augmented target, tail guard, residual and the sampling path's distribution."""

from __future__ import annotations

import math

import pytest
import torch

from decoding.drafters import Draft
from decoding.generate import accept, generate, run_to_end
from decoding.loaded_model import Prompt
from decoding.sampling import accept_probability, greedy_choice, probabilities, residual, retrieval_augmented
from decoding.session import Sampler
from decoding.settings import DecodingSettings
from tests.tiny import tiny_model


def test_eta_zero_is_the_target() -> None:
    p = torch.tensor([0.5, 0.3, 0.2])
    q = torch.tensor([0.1, 0.1, 0.8])
    assert torch.equal(retrieval_augmented(p, q, 0.0, 0.1), p)
    assert torch.allclose(residual(p, p, q), torch.tensor([0.4, 0.2, 0.0]) / 0.6)


def test_retrieval_augmented_formula_and_tail_guard() -> None:
    p = torch.tensor([0.60, 0.30, 0.09, 0.01])
    q = torch.tensor([0.10, 0.80, 0.05, 0.05])
    eta = 2.0
    raw = torch.softmax(torch.log(p) + eta * (q - p), dim=-1)
    got = retrieval_augmented(p, q, eta, tail_guard=0.1)
    tail = raw < 0.1 * raw.max()
    expected = torch.where(tail, p, raw)
    expected = expected / expected.sum()
    assert torch.allclose(got, expected)
    assert tail[3] and not tail[1]  # the rare token keeps the target's own probability
    # the drafter's favourite gains mass relative to the target
    assert got[1] > p[1]


def test_accept_probability_and_residual_hand_built() -> None:
    p = torch.tensor([0.2, 0.5, 0.3])
    q = torch.tensor([0.6, 0.2, 0.2])
    p_hat = torch.tensor([0.3, 0.4, 0.3])
    assert math.isclose(accept_probability(0, p_hat, q), 0.5)
    assert accept_probability(1, p_hat, q) == 1.0
    r = residual(p, p_hat, q)  # max(p - p_hat, p - q, 0) = [0, 0.3, 0.1] -> normalised
    assert torch.allclose(r, torch.tensor([0.0, 0.75, 0.25]))
    assert torch.equal(residual(p, p, p), p)  # an all-zero residual falls back to p


def test_top_p_keeps_the_smallest_nucleus() -> None:
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    probs = probabilities(logits, 1.0, top_p=0.8)
    assert torch.allclose(probs, torch.tensor([0.625, 0.375, 0.0, 0.0]))


def test_greedy_rule() -> None:
    z = torch.tensor([2.0, 1.9, -1.0])
    assert greedy_choice(z, None, 5.0, 0.1) == 0
    assert greedy_choice(z, torch.tensor([0.0, 0.0, 0.0]), 0.0, 0.1) == 0
    # a confident drafter tips a near tie with eta > 0
    assert greedy_choice(z, torch.tensor([-5.0, 5.0, -5.0]), 5.0, 0.1) == 1


def _chi_square_ok(counts: torch.Tensor, exact: torch.Tensor) -> tuple[bool, float, float]:
    """Chi-square goodness of fit at the 99.9% level (rare outcomes pooled into one bin)."""
    n = counts.sum()
    expected = exact * n
    bins = expected >= 5
    observed = torch.cat([counts[bins], counts[~bins].sum()[None]])
    expected_b = torch.cat([expected[bins], expected[~bins].sum()[None]])
    keep = expected_b > 0
    observed, expected_b = observed[keep], expected_b[keep]
    chi2 = float(((observed - expected_b) ** 2 / expected_b).sum())
    dof = observed.numel() - 1
    z = 3.09  # 99.9% quantile via the Wilson-Hilferty approximation
    critical = dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3
    return chi2 < critical, chi2, critical


def output_distribution(p: torch.Tensor, q: torch.Tensor, eta: float, tail_guard: float) -> torch.Tensor:
    """What one draft-then-accept step emits, in closed form (shared/RAPID.md, "One decoding step").

    A draft x ~ q is kept with probability min(1, p_hat(x)/q(x)), so min(q, p_hat) is emitted by
    acceptance; the rest of the mass comes from the residual norm(max(p - p_hat, p - q, 0)). With
    eta = 0 (p_hat = p) this is exactly p. With eta > 0 it is not p_hat itself: the residual is drawn
    from the target's own p, as the algorithm states.
    """
    p_hat = retrieval_augmented(p, q, eta, tail_guard)
    kept = torch.minimum(q, p_hat)
    return kept + (1 - kept.sum()) * residual(p, p_hat, q)


@pytest.mark.parametrize("eta", [0.0, 3.0])
def test_accept_and_residual_draw_the_exact_output_distribution(eta: float) -> None:
    """1e5 single-token drafts through the production accept(): the emitted token's distribution."""
    temperature, draws = 1.3, 100_000
    z = torch.tensor([2.0, 1.5, 0.3, -0.5, 0.9, -2.0])
    q_logits = torch.tensor([0.1, 2.2, 0.2, 1.0, -1.0, -1.5])
    settings = DecodingSettings(temperature=temperature, eta=eta)
    sampler = Sampler(settings, torch.Generator().manual_seed(1))
    p, q = probabilities(z, temperature), probabilities(q_logits, temperature)
    exact = output_distribution(p, q, eta, settings.tail_guard)
    if eta == 0:
        torch.testing.assert_close(exact, p)
    drafts = torch.multinomial(q, draws, replacement=True, generator=torch.Generator().manual_seed(2)).tolist()
    target_logits = torch.stack([z, z])  # row 0 scores the draft, row 1 would give the bonus token
    counts = torch.zeros(len(z))
    rejected = 0
    for token in drafts:
        out = accept(Draft([token], [q_logits]), target_logits, sampler, eta)
        counts[out[0]] += 1
        rejected += len(out) == 1
    assert 0 < rejected < draws  # both branches ran
    ok, chi2, critical = _chi_square_ok(counts, exact)
    assert ok, (chi2, critical)
    if eta > 0:  # the distribution really moved towards the drafter: the test would see a wrong rule
        assert not _chi_square_ok(counts, p)[0]


def _second_token_counts(method: str, draws: int, first: int) -> tuple[torch.Tensor, int, int]:
    """Counts of the 2nd answer token given the 1st is `first`, with drafted and accepted totals.

    The 1st token is sampled from the prefill's logits; the 2nd goes through draft, verify and
    accept/residual (max_new_tokens 3 leaves room for one draft), which is the path under test.
    """
    target = tiny_model(1, layers=1)
    drafter = tiny_model(2, layers=1, noise_from=1, noise=0.3)
    prompt = Prompt([3, 4, 5, 6, 7, 8], [9, 10])
    counts = torch.zeros(256)
    drafted = accepted = 0
    for seed in range(draws):
        s = DecodingSettings(method=method, temperature=1.5, max_new_tokens=3, gamma=1, seed=seed)
        out = run_to_end(generate(method, target, drafter, prompt, prompt, s))
        if out.token_ids[0] == first:
            counts[out.token_ids[1]] += 1
            drafted += out.stats.drafted
            accepted += out.stats.accepted
    return counts, drafted, accepted


def test_sampling_eta0_matches_target_distribution() -> None:
    """Chi-square: speculative sampling (eta = 0) end to end draws from the target's own distribution."""
    target = tiny_model(1, layers=1)
    prompt = Prompt([3, 4, 5, 6, 7, 8], [9, 10])
    cache = target.model.new_cache(16)
    first_logits = target.model.forward(torch.tensor(prompt.tokens), cache)
    first = int(probabilities(first_logits, 1.5).argmax())
    exact = probabilities(target.model.forward(torch.tensor([first]), cache), 1.5)

    counts, drafted, accepted = _second_token_counts("sd", draws=1500, first=first)
    assert counts.sum() > 100
    assert drafted > 0 and 0 < accepted < drafted  # the drafter drafted and was sometimes rejected
    ok, chi2, critical = _chi_square_ok(counts, exact)
    assert ok, (chi2, critical)
