"""Greedy RAPID through a scheduler builds its drafter aside (decoding/generate.py DrafterBuild): the
target takes plain steps meanwhile, so the second token comes one step after the first, and the
answer is still LC's, token for token."""

from __future__ import annotations

import threading
from dataclasses import replace

import decoding.generate as generate_module
from decoding.generate import Finished, PassStats, generate, run_to_end
from decoding.loaded_model import Prompt
from decoding.scheduler import Scheduler
from decoding.settings import DecodingSettings
from tests.tiny import EXACT_VOCAB, random_prompt

HELD_S = 2.0  # how long the drafter's build waits for the test's go (the old code waits it all out)
PLAIN_PASSES = 5


def test_the_target_steps_on_while_the_drafter_is_built(small_vocab_pair, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    target, drafter = small_vocab_pair
    prompt = random_prompt(300, seed=5, vocab=EXACT_VOCAB)
    rag = Prompt(prompt.prefix[75:], prompt.suffix)
    settings = DecodingSettings(method="rapid", max_new_tokens=60, gamma=4, eta=0.0)
    lc = run_to_end(generate("lc", target, drafter, prompt, rag, replace(settings, method="lc")))

    go = threading.Event()
    real = generate_module.build_drafter

    def held(*args, **kwargs):  # type: ignore[no-untyped-def]
        go.wait(HELD_S)
        return real(*args, **kwargs)

    monkeypatch.setattr(generate_module, "build_drafter", held)
    finished: Finished | None = None
    with Scheduler().session("rapid") as ticket:
        assert ticket is not None
        for event in generate("rapid", target, drafter, prompt, rag, settings, run=ticket.run):
            if isinstance(event, PassStats) and event.stats.target_passes >= PLAIN_PASSES:
                go.set()
            if isinstance(event, Finished):
                finished = event
    assert finished is not None
    assert finished.token_ids == lc.token_ids
    assert finished.stats.second_token_s is not None and finished.stats.second_token_s < HELD_S / 2
    assert finished.stats.drafted > 0 and finished.stats.accepted > 0  # it drafted once built
    assert finished.stats.target_passes < lc.stats.target_passes


def test_alone_or_sampling_it_builds_the_drafter_first(small_vocab_pair, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Without a scheduler the two threads' passes would run at once; sampling would make the answer
    depend on when the drafter came: then the drafter is built before the second token, as before."""
    target, drafter = small_vocab_pair

    def never(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("built aside")

    monkeypatch.setattr(generate_module, "DrafterBuild", never)
    prompt = random_prompt(200, seed=6, vocab=EXACT_VOCAB)
    rag = Prompt(prompt.prefix[50:], prompt.suffix)
    for settings, run in [(DecodingSettings(method="rapid", max_new_tokens=30, gamma=4), None),
                          (DecodingSettings(method="rapid", max_new_tokens=30, gamma=4, temperature=0.8), "ticket")]:
        with Scheduler().session("rapid") as ticket:
            assert ticket is not None
            out = run_to_end(generate("rapid", target, drafter, prompt, rag, settings,
                                      **({"run": ticket.run} if run else {})))
        assert out.stats.target_passes >= 2 and out.stats.drafted > 0
