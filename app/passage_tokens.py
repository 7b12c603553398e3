"""Where the retrieved passages lie in the long prompt, in tokens: what a focus drafter keeps of
the target's cache (decoding.methods.Drafting.FOCUS).

Retrieval gives character ranges in the long context's pieces; each piece is tokenised alone after
a separator (decoding.loaded_model.Prompt), so the tokeniser's offsets map a range to the piece's tokens.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Sequence

from decoding.loaded_model import PIECE_SEPARATOR, LoadedModel, Prompt


def passage_token_spans(model: LoadedModel, prompt: Prompt, pieces: Sequence[str],
                 spans: Sequence[tuple[int, int, int]]) -> list[tuple[int, int]]:
    """Token ranges of the prompt's prefix covering each (piece index, first char, end char) span:
    every token that overlaps the characters, so a passage is never cut inside a token."""
    ranges: list[tuple[int, int]] = []
    for index in sorted({piece for piece, _, _ in spans}):
        offsets = model.tokenizer(PIECE_SEPARATOR + pieces[index], add_special_tokens=False,
                                  return_offsets_mapping=True)["offset_mapping"]
        start = prompt.boundaries[index]
        end = prompt.boundaries[index + 1] if index + 1 < len(prompt.boundaries) else len(prompt.prefix)
        if len(offsets) != end - start:
            raise ValueError(f"piece {index} tokenises to {len(offsets)} tokens, the prompt holds {end - start}")
        ends, begins = [b for _, b in offsets], [a for a, _ in offsets]
        shift = len(PIECE_SEPARATOR)
        for _, first, last in (s for s in spans if s[0] == index):
            # Tokens whose end lies after the span's start and whose start lies before its end.
            lo, hi = bisect_right(ends, first + shift), bisect_left(begins, last + shift)
            if lo < hi:
                ranges.append((start + lo, start + hi))
    return ranges
