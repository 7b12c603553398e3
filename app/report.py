"""An answer's results as data and as text: the one layout shared by `ask --json`, the UI's API, eval and bench.

`ask --json` and the `/ask` API return the same records, so a script can switch between them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict

from app.conversation import FollowUp
from app.engine_label import engine_label
from app.events import STILL_READING, Done
from app.speedup import Speedup
from decoding.stats import Stats
from retrieval.types import Citation, Reading


def stats_record(stats: Stats) -> dict[str, object]:
    """Every counter and derived rate; the per-token timestamps are left out (they would dominate a file)."""
    record = stats.to_dict()
    record.pop("token_times", None)
    return record


def speedup_record(speedup: Speedup) -> dict[str, object]:
    return {"speedup_vs_lc": speedup.value, "speedup_basis": speedup.label}


def sources_record(citations: Sequence[Citation]) -> list[dict[str, object]]:
    return [
        {"document": c.source, "page": c.page, "section": c.section, "excerpt": c.excerpt, "score": c.score,
         "read_by_target": c.read}
        for c in citations
    ]


def reading_record(reading: Reading | None) -> dict[str, object] | None:
    """Which part of a corpus larger than the target's window the target read (None: all of it)."""
    if reading is None:
        return None
    return {
        "part": reading.window, "parts": reading.windows, "label": reading.label,
        "evidence": [asdict(e) for e in reading.evidence],
        "retrieved_elsewhere": reading.elsewhere, "split": reading.split, "note": reading.note(),
    }


def follow_up_record(follow_up: FollowUp | None) -> dict[str, object] | None:
    """How a follow-up was read (None: the question started the conversation)."""
    if follow_up is None:
        return None
    return {"standalone_question": follow_up.standalone, "history_turns": follow_up.turns,
            "history_dropped": follow_up.dropped, "note": follow_up.note()}


def done_record(done: Done) -> dict[str, object]:
    """The whole answer: `ask --json` prints this object."""
    return {
        "answer": done.answer,
        "sources": sources_record(done.citations),
        "stats": stats_record(done.stats),
        **speedup_record(done.speedup),
        "lc_stats": stats_record(done.lc_stats) if done.lc_stats else None,
        "read": reading_record(done.reading),
        "conversation": follow_up_record(done.follow_up),
        "still_reading": still_reading_record(done.still_reading),
    }


def still_reading_record(still_reading: bool) -> str | None:
    """Why an answer came from the retrieved passages alone (None: it read what its method reads)."""
    return STILL_READING if still_reading else None


def _figure(value: float | None, spec: str) -> str:
    return format(value, spec) if value is not None else "n/a"


def _wait(stats: Stats) -> str:
    """The documents' cold prefill (and passages' encoding) that came before generation, when any."""
    return f" (of which {stats.wait_s:.2f} s reading the documents first)" if stats.wait_s >= 0.005 else ""


def stats_lines(done: Done) -> list[str]:
    s = done.stats
    speed = f"{done.speedup.value:.2f}x" if done.speedup.value is not None else "n/a"
    cached = f" ({s.prefix_cached_tokens} from the prefix cache)" if s.prefix_cached_tokens else ""
    return [
        f"method {s.method}: {s.generated} tokens generated, {s.drafted} drafted, {s.accepted} accepted",
        f"acceptance rate {_figure(s.acceptance_rate, '.1%')}, "
        f"mean accepted length per target pass {_figure(s.mean_accepted_length, '.2f')}",
        f"context {s.context_tokens} tokens{cached}, drafter context {s.draft_context_tokens} tokens",
        f"answer in {s.answer_s:.2f} s end to end",
        f"first token after {s.question_to_first_s or s.first_token_s:.2f} s from the question{_wait(s)}, "
        f"prefill {s.prefill_s:.2f} s, decode {s.decode_s:.2f} s, "
        f"{_figure(s.decode_tokens_per_s or None, '.2f')} tokens/s",
        f"speedup over LC decoding: {speed} ({done.speedup.label})",
        f"engine: {engine_label(s.engine)}",
        *([f"WARNING: {s.engine['warning']}"] if s.engine.get("warning") else []),
    ]


def summary_text(done: Done) -> str:
    """What `ask` prints after the streamed answer: the sources, then the statistics."""
    sources = [f"  [{i}] {c.label()}{'' if c.read else ' (not read by the target)'}: {c.excerpt[:200]}"
               for i, c in enumerate(done.citations, 1)]
    read = [f"  The target {done.reading.note()}"] if done.reading else []
    read += [f"  {done.follow_up.note()}"] if done.follow_up else []
    read += [f"  Answered early: {STILL_READING}; ask again once they are read for the answer from the full "
             "documents"] if done.still_reading else []
    stats = [f"  {line}" for line in stats_lines(done)]
    return "\n".join(["", "", "Sources:", *read, *sources, "", "Statistics:", *stats])
