"""The ETA of a prefill whose chunks cost more the deeper they are (app/eta.py through app/progress.Job)."""

from __future__ import annotations

import types

import pytest

from app import progress
from app.eta import DepthCostFit
from app.progress import Job
from decoding.pass_costs import depth_cost_ratio
from decoding.transformer import ModelArgs

CHUNK = 1024
HEADER = 39
TOTAL = 20597  # the demo PDF's prefix: a header, then one document in 1,024-token chunks
# Per token: the weights' cost, then the attention's per token of depth. 172 tokens/s at the
# start and 67 at 16K, as the demo PDF's read went.
WEIGHTS_S = 1 / 172
ATTENTION_S = (1 / 67 - 1 / 172) / 16_000


# Qwen2.5-Coder-1.5B's shape: its b / a is about two thirds of the curve's above (a prior, not the truth).
QWEN_1_5B = ModelArgs(vocab_size=151936, dim=1536, n_layers=28, n_heads=12, n_kv_heads=2, head_dim=128,
                      intermediate_size=8960, norm_eps=1e-6, rope_theta=1e6, qkv_bias=True, tie_embeddings=True,
                      max_positions=32768)


def chunk_seconds(start: int, end: int, noise: float = 1.0) -> float:
    return noise * (end - start) * (WEIGHTS_S + ATTENTION_S * (start + end) / 2)


def prefill_steps() -> list[tuple[int, int]]:
    """(start, end) of each pass, as decoding.prefill.prefill_parts reports them."""
    steps, start = [(0, HEADER)], HEADER
    while start < TOTAL:
        steps.append((start, min(start + CHUNK, TOTAL)))
        start = steps[-1][1]
    return steps


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def perf_counter(self) -> float:
        return self.now


def eta_and_truth_at(share: float, monkeypatch: pytest.MonkeyPatch, noise: list[float] | None = None,
                     **job_fields: object) -> tuple[float, float]:
    """The job's ETA when `share` of the read is done, and the true remaining time."""
    clock = FakeClock()
    monkeypatch.setattr(progress, "time", types.SimpleNamespace(perf_counter=clock.perf_counter))
    steps = prefill_steps()
    costs = [chunk_seconds(s, e, noise[i % len(noise)] if noise else 1.0) for i, (s, e) in enumerate(steps)]
    job = Job("Reading documents", TOTAL, started=clock.now, **job_fields)
    job.update(0, TOTAL)
    for i, ((_, end), cost) in enumerate(zip(steps, costs, strict=True)):
        clock.now += cost
        event = job.update(end, TOTAL)
        if end >= share * TOTAL:
            assert event.eta_s is not None
            return event.eta_s, sum(costs[i + 1 :])
    raise AssertionError("never reached")


def test_the_eta_at_10_percent_is_within_25_percent_of_the_true_remaining_time(monkeypatch: pytest.MonkeyPatch) -> None:
    # A rate (tokens done / seconds) promises about half the true time here: later chunks cost more.
    eta, truth = eta_and_truth_at(0.10, monkeypatch)
    assert abs(eta - truth) <= 0.25 * truth, (eta, truth)


@pytest.mark.parametrize("noise", [
    [1.05, 0.95, 1.03, 0.97, 1.04, 0.96],  # a shared machine's few percent, chunk to chunk
    [1.3, 0.95, 1.0, 1.05],  # a slow first chunk (a cold start)
    [0.9, 1.1],
])
def test_the_eta_holds_with_noisy_chunk_times(monkeypatch: pytest.MonkeyPatch, noise: list[float]) -> None:
    # A fit from the chunks alone tilts with the first few chunks' noise; the model's shape steadies it.
    ratio = depth_cost_ratio(QWEN_1_5B)
    assert 0.5 < ratio / (ATTENTION_S / WEIGHTS_S) < 0.8
    for share in (0.10, 0.25, 0.5, 0.75):
        eta, truth = eta_and_truth_at(share, monkeypatch, noise, prior_ratio=ratio)
        assert abs(eta - truth) <= 0.25 * truth, (share, eta, truth)


def test_a_job_polled_mid_step_counts_the_time_since_its_last_step(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock()
    monkeypatch.setattr(progress, "time", types.SimpleNamespace(perf_counter=clock.perf_counter))
    job = Job("Drafter reading passages", 4000, started=clock.now, depth=None)
    job.update(0, 4000)
    for done in (1000, 2000):
        clock.now += 10.0
        job.update(done, 4000)
    assert job.event().eta_s == pytest.approx(20.0)  # a constant cost: its rate
    clock.now += 4.0
    assert job.event().eta_s == pytest.approx(16.0)


def test_a_fit_recovers_the_cost_curve_and_keeps_it_from_falling() -> None:
    fit = DepthCostFit()
    assert fit.remaining_s(0, 100) is None
    for start in range(0, 4096, CHUNK):
        fit.add(start, start + CHUNK, chunk_seconds(start, start + CHUNK))
    a, b = fit.coefficients() or (0.0, 0.0)
    assert a == pytest.approx(WEIGHTS_S) and b == pytest.approx(ATTENTION_S)
    assert fit.remaining_s(4096, TOTAL) == pytest.approx(chunk_seconds(4096, TOTAL))
    falling = DepthCostFit()
    falling.add(0, 1000, 2.0)
    falling.add(1000, 2000, 1.0)
    assert falling.coefficients() == pytest.approx((1.5e-3, 0.0))  # never cheaper with depth: the rate


def test_a_prefill_restored_in_part_starts_at_its_depth(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock()
    monkeypatch.setattr(progress, "time", types.SimpleNamespace(perf_counter=clock.perf_counter))
    restored = 10_000  # the first documents came from the prefix cache: the rest is read that deep
    job = Job("Reading documents", TOTAL - restored, started=clock.now, depth=restored)
    job.update(0, TOTAL - restored)
    done = 0
    while done < 3 * CHUNK:
        clock.now += chunk_seconds(restored + done, restored + done + CHUNK)
        done += CHUNK
        event = job.update(done, TOTAL - restored)
    truth = chunk_seconds(restored + done, TOTAL)
    assert event.eta_s == pytest.approx(truth)
