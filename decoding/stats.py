"""The statistics record shared by the CLI's JSON, the UI panel, the benchmarks and eval.

Definitions (README "Statistics" states the same): the first answer token comes from the target's
prefill logits, so it belongs to time-to-first-token, not to decoding. decode_s runs from the first
token to the last, without the drafter's own prefill and without the time the consumer of the
generation spends between tokens; decode tokens/s = (generated - 1) / decode_s.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class Stats:
    method: str
    context_tokens: int = 0  # prompt tokens the target (or the single model) read
    draft_context_tokens: int = 0  # prompt tokens the drafter read (0 without a model drafter)
    prefix_cached_tokens: int = 0  # prompt tokens restored from the prefix cache, not prefilled
    generated: int = 0  # answer tokens emitted
    drafted: int = 0  # tokens proposed by the drafter
    accepted: int = 0  # proposals the target accepted
    target_passes: int = 0  # target forward passes that produced answer tokens (the prefill's included)
    prefill_s: float = 0.0  # the target's prompt plus the drafter's (built after the first token)
    first_token_s: float = 0.0  # from the start of generation to the first answer token
    answer_s: float = 0.0  # from the question's arrival to its last token, retrieval and waits included
    question_to_first_s: float = 0.0  # from the question's arrival to the first answer token (set by the app)
    # Before generation began: the documents' cold prefill and passages' encoding the question waited
    # for (set by the app; part of question_to_first_s, not of prefill_s).
    wait_s: float = 0.0
    decode_s: float = 0.0  # from the first answer token to the last, the drafter's prefill excluded
    second_token_s: float = 0.0  # the wait from the first answer token to the second, the drafter's read included
    accepted_lengths: list[int] = field(default_factory=list)  # tokens produced per target pass
    token_times: list[float] = field(default_factory=list)  # decode seconds at each emitted token
    # The draft length chosen before each verify when a scheduler plans it (batch > 1: shorter drafts).
    draft_lengths: list[int] = field(default_factory=list)
    finish_reason: str = ""  # "eos" | "length"
    # What ran: decoding.engine_info.engine_description of the target (engine, kernels, threads, warning).
    engine: dict[str, str] = field(default_factory=dict)

    # ------------------------------------------------------------------ recorded by the loop

    def record_pass(self, emitted: int, generated: int, decode_s: float) -> None:
        """A target pass produced `emitted` tokens (a closing stop token included)."""
        self.target_passes += 1
        self.accepted_lengths.append(emitted)
        self.generated = generated
        self.decode_s = decode_s
        if self.target_passes == 1:  # prefill_s holds the target's prefill alone at this point
            self.first_token_s = self.prefill_s + decode_s

    def record_draft(self, drafted: int, accepted: int) -> None:
        self.drafted += drafted
        self.accepted += accepted

    # ------------------------------------------------------------------------ derived

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted / self.drafted if self.drafted else None

    @property
    def mean_accepted_length(self) -> float | None:
        """Tokens produced per target pass (accepted drafts plus the target's own token, stop token included)."""
        return sum(self.accepted_lengths) / self.target_passes if self.target_passes else None

    @property
    def decode_tokens_per_s(self) -> float | None:
        """Tokens after the first per decode second (the first token comes from the prefill)."""
        return (self.generated - 1) / self.decode_s if self.generated > 1 and self.decode_s > 0 else None

    def to_dict(self) -> dict[str, object]:
        data = asdict(self)
        data["acceptance_rate"] = self.acceptance_rate
        data["mean_accepted_length"] = self.mean_accepted_length
        data["decode_tokens_per_s"] = self.decode_tokens_per_s
        return data
