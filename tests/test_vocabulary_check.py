"""The drafter and the target must share one vocabulary: byte-identical tokenizer files settle it
without the vocabulary keys (most of a second per real model)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from decoding.generate import check_same_vocabulary
from tests.tiny import tiny_model


class NoVocabulary:
    """A tokenizer whose vocabulary must not be read."""

    def get_vocab(self) -> dict[str, int]:
        raise AssertionError("the vocabulary keys were computed")


def model_in(directory: Path, tokenizer_json: str, tokenizer: object, seed: int):  # type: ignore[no-untyped-def]
    directory.mkdir()
    (directory / "tokenizer.json").write_text(tokenizer_json)
    return replace(tiny_model(seed), directory=directory, tokenizer=tokenizer)


def test_identical_tokenizer_files_need_no_vocabulary_keys(tmp_path: Path) -> None:
    target = model_in(tmp_path / "target", '{"model": {"vocab": {"a": 0}}}', NoVocabulary(), 1)
    drafter = model_in(tmp_path / "drafter", '{"model": {"vocab": {"a": 0}}}', NoVocabulary(), 2)
    check_same_vocabulary(target, drafter)


def test_other_tokenizer_files_compare_the_vocabularies(tmp_path: Path) -> None:
    target = model_in(tmp_path / "target", '{"model": {"vocab": {"a": 0}}}', NoVocabulary(), 1)
    drafter = model_in(tmp_path / "drafter", '{"model": {"vocab": {"b": 0}}}', NoVocabulary(), 2)
    with pytest.raises(AssertionError, match="vocabulary keys"):
        check_same_vocabulary(target, drafter)
    same = replace(tiny_model(2), directory=tmp_path / "drafter")  # byte tokens, like tiny_model(1)'s
    check_same_vocabulary(tiny_model(1), same)
