"""Distributions and the acceptance rule of RAPID (shared/RAPID.md, "One decoding step").

All functions take fp32 tensors over the vocabulary. With eta = 0 every rule here reduces to
plain speculative sampling, whose output distribution is exactly the target's.
"""

from __future__ import annotations

import torch


def probabilities(logits: torch.Tensor, temperature: float, top_p: float = 1.0) -> torch.Tensor:
    """softmax(z / T), then nucleus filtering (the same filter for target and drafter)."""
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p >= 1.0:
        return probs
    sorted_probs, order = probs.sort(descending=True)
    outside = sorted_probs.cumsum(-1) - sorted_probs >= top_p  # keep the smallest set reaching top_p
    sorted_probs[outside] = 0.0
    filtered = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return filtered / filtered.sum()


def retrieval_augmented(p: torch.Tensor, q: torch.Tensor, eta: float, tail_guard: float) -> torch.Tensor:
    """p_hat = softmax(z/T + eta (q - p)) with the tail guard.

    softmax(z/T) is p, so z/T equals log p up to a constant: writing it as log p keeps tokens that
    nucleus filtering removed from p at zero. Where p_hat < tail_guard * max(p_hat) the target's own
    p is kept, so the drafter can boost plausible tokens but never push up or wipe out the tail alone.
    """
    if eta == 0:
        return p
    p_hat = torch.softmax(torch.log(p) + eta * (q - p), dim=-1)
    tail = p_hat < tail_guard * p_hat.max()
    p_hat = torch.where(tail, p, p_hat)
    return p_hat / p_hat.sum()


def accept_probability(token: int, p_hat: torch.Tensor, q: torch.Tensor) -> float:
    """min(1, p_hat[x] / q[x]); a deterministic draft (lookup) has q[x] = 1."""
    q_x = float(q[token])
    return 1.0 if q_x <= 0 else min(1.0, float(p_hat[token]) / q_x)


def residual(p: torch.Tensor, p_hat: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """norm(max(p - p_hat, p - q, 0)): where the replacement is drawn after a rejection."""
    r = torch.clamp(torch.maximum(p - p_hat, p - q), min=0.0)
    total = r.sum()
    # A rejection with an all-zero residual has probability zero when eta = 0; with eta > 0 it
    # can happen (p_hat above both p and q everywhere it matters), and then p itself is used.
    return r / total if total > 0 else p


def argmax(values: torch.Tensor) -> int:
    """Index of the first largest value of a 1-D tensor; on a CPU through numpy, whose argmax
    over a vocabulary of logits runs ~10x faster than torch's (it runs several times per pass)."""
    if values.device.type == "cpu" and values.dim() == 1:
        return int(values.numpy().argmax())
    return int(values.argmax())


def greedy_choice(target_logits: torch.Tensor, q_logits: torch.Tensor | None, eta: float, tail_guard: float) -> int:
    """The greedy rule: argmax of the retrieval-augmented target at T = 1.

    With eta = 0 (or no drafter distribution) this is argmax(z), exactly the target's greedy token.
    """
    if eta == 0 or q_logits is None:
        return argmax(target_logits)
    p = torch.softmax(target_logits, dim=-1)
    q = torch.softmax(q_logits, dim=-1)
    return argmax(retrieval_augmented(p, q, eta, tail_guard))


def sample(probs: torch.Tensor, generator: torch.Generator) -> int:
    return int(torch.multinomial(probs, 1, generator=generator))
