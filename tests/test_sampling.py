"""The retrieval-augmented target, tail guard, residual and the sampling path's distribution."""

from __future__ import annotations

import math

import torch

from decoding.generate import generate, run_to_end
from decoding.models import Prompt
from decoding.sampling import accept_probability, greedy_choice, probabilities, residual, retrieval_augmented
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


def _second_token_counts(method: str, draws: int, first: int) -> torch.Tensor:
    """Counts of the 2nd answer token given the 1st is `first`.

    The 1st token is sampled from the prefill's logits; the 2nd goes through draft, verify and
    accept/residual, which is the path under test.
    """
    target = tiny_model(1, layers=1)
    drafter = tiny_model(2, layers=1, noise_from=1, noise=0.3)
    prompt = Prompt([3, 4, 5, 6, 7, 8], [9, 10])
    counts = torch.zeros(256)
    for seed in range(draws):
        s = DecodingSettings(method=method, temperature=1.5, max_new_tokens=2, gamma=1, seed=seed)
        out = run_to_end(generate(method, target, drafter, prompt, prompt, s))
        if out.token_ids[0] == first:
            counts[out.token_ids[1]] += 1
    return counts


def test_sampling_eta0_matches_target_distribution() -> None:
    """Chi-square: speculative sampling (eta = 0) draws from the target's own distribution."""
    target = tiny_model(1, layers=1)
    prompt = Prompt([3, 4, 5, 6, 7, 8], [9, 10])
    cache = target.model.new_cache(16)
    first_logits = target.model.forward(torch.tensor(prompt.tokens), cache)
    first_probs = probabilities(first_logits, 1.5)
    first = int(first_probs.argmax())
    exact = probabilities(target.model.forward(torch.tensor([first]), cache), 1.5)

    counts = _second_token_counts("sd", draws=1500, first=first)
    n = counts.sum()
    assert n > 100
    expected = exact * n
    bins = expected >= 5  # pool the rare tokens into one bin, as chi-square requires
    observed = torch.cat([counts[bins], counts[~bins].sum()[None]])
    expected_b = torch.cat([expected[bins], expected[~bins].sum()[None]])
    chi2 = float(((observed - expected_b) ** 2 / expected_b).sum())
    dof = observed.numel() - 1
    # 99.9% quantile of chi-square via the Wilson-Hilferty approximation
    z = 3.09
    critical = dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3
    assert chi2 < critical, (chi2, critical, dof)
