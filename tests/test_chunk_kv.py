"""RAPID's drafter context assembled from KV encoded per chunk (tiny models)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from app.chunk_kv import ChunkKV, prune
from decoding import kv_quant
from decoding.generate import generate, run_to_end
from decoding.loaded_model import LoadedModel, Prompt
from decoding.prefill import PrefixCacheHooks, prefill
from decoding.prefix_cache import PrefixCache
from decoding.segments import assemble, encode_piece
from decoding.settings import DecodingSettings
from tests.tiny import tiny_model

PASSAGES = [
    "[notes.txt, p. 1]\nThe quick brown fox jumps over the lazy dog near the river bank.",
    "[notes.txt, p. 4]\nread.fwf reads fixed width files; it needs the field widths.",
    "[other.txt]\nA third passage, shorter.",
]
QUESTION = "Which function reads fixed width files?"


@pytest.fixture(scope="module", params=[None, kv_quant.STORAGE], ids=["kv-fp32", "kv8"])
def pair(request) -> tuple[LoadedModel, LoadedModel]:
    """Target and drafter, their caches (and so their chunk KV) in the model's dtype or 8-bit."""
    pair = tiny_model(1, kv_dtype=request.param), tiny_model(2, noise_from=1, noise=0.01, kv_dtype=request.param)
    assert all(m.model.new_cache(1).quantized == (request.param is not None) for m in pair)
    return pair


def _alone_at(model: LoadedModel, tokens: list[int], position: int):
    """Reference: the tokens run alone (attending only to each other) starting at `position`."""
    cache = model.model.new_cache(len(tokens) + 1)
    cache.next_position = position
    model.model.prefill(torch.tensor(tokens), cache)
    return cache


@pytest.mark.parametrize(("dtype", "kv_dtype"), [(torch.float32, None), (torch.bfloat16, None),
                                                (torch.float32, kv_quant.STORAGE), (torch.bfloat16, kv_quant.STORAGE)])
def test_placed_keys_match_an_encoding_at_that_position(dtype: torch.dtype, kv_dtype: torch.dtype | None) -> None:
    """Encoded at 0 and rotated to position p = encoded at p directly (RoPE makes attention
    depend on relative positions only, so the pre-RoPE keys and the values are the same). 8-bit
    keys are dequantized, rotated and quantized again: close to the direct ones, not equal."""
    model = tiny_model(1, dtype, kv_dtype=kv_dtype)
    header, piece = model.encode("a header of some length "), model.piece_tokens(PASSAGES[1])
    placed = assemble(model.model, [encode_piece(model.model, header), encode_piece(model.model, piece)], 200)
    direct = _alone_at(model, piece, len(header))
    span = slice(len(header), len(header) + len(piece))
    # bf16 rounds differently at other positions, and the difference grows through the layers; the
    # 8-bit form adds its own roundings (and a second one for the moved keys). Far below the 0.5 of
    # keys left unrotated (checked below).
    tolerance = 1e-5 if dtype == torch.float32 else 0.05
    if kv_dtype is not None:
        tolerance = 0.1
    for layer in range(model.model.args.n_layers):
        expected_k, expected_v = direct.keys[layer][:, : len(piece)], direct.values[layer][:, : len(piece)]
        assert _relative_error(placed.keys[layer][:, span], expected_k) < tolerance
        assert _relative_error(placed.values[layer][:, span], expected_v) < tolerance
        # Not a vacuous comparison: the same keys left where they were encoded are far off.
        assert _relative_error(encode_piece(model.model, piece)[f"k{layer}"], expected_k) > 0.5


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = _values(actual), _values(expected)
    return float((actual - expected).norm() / expected.norm())


def _values(kv: torch.Tensor, head_dim: int = 64) -> torch.Tensor:
    """fp32 values of K/V in either form (the tiny models' head_dim is 64)."""
    return kv_quant.dequantize(kv, head_dim) if kv_quant.is_quantized(kv) else kv.float()


def test_8bit_pieces_round_trip_the_store_and_unmoved_ones_the_assembly(tmp_path: Path) -> None:
    """A stored 8-bit piece is read back byte for byte; assembled at the position it was encoded
    at, its bytes are copied as they are; moved, its keys change (requantized) and its values do not."""
    model = tiny_model(2, kv_dtype=kv_quant.STORAGE)
    prompt = model.prompt(PASSAGES, QUESTION)
    store = ChunkKV(tmp_path, model.model, "key", prompt.header)
    passages = ChunkKV.prompt_passages(prompt, ["a-000000", "a-000001", "b-000000"])
    store.build(passages)
    encoded = encode_piece(model.model, passages[1].tokens, after=prompt.header)
    read = store.piece(passages[1])
    assert set(read) == set(encoded)
    for name, tensor in encoded.items():
        assert read[name].dtype == tensor.dtype and torch.equal(read[name], tensor), name
    assert read["k0"].dtype == kv_quant.STORAGE and read["k0"].shape[-1] == kv_quant.row_bytes(64)
    header = store.header_kv()
    placed = assemble(model.model, [header, read], 100)  # encoded right after the header: not moved
    moved = assemble(model.model, [header, store.piece(passages[0]), read], 200)
    span = slice(len(prompt.header), len(prompt.header) + len(passages[1].tokens))
    at = len(prompt.header) + len(passages[0].tokens)
    for layer in range(model.model.args.n_layers):
        assert placed.quantized and torch.equal(placed.keys[layer][:, span], read[f"k{layer}"])
        assert torch.equal(placed.values[layer][:, span], read[f"v{layer}"])
        keys = moved.keys[layer][:, at : at + len(passages[1].tokens)]
        assert not torch.equal(keys, read[f"k{layer}"])
        assert torch.equal(moved.values[layer][:, at : at + len(passages[1].tokens)], read[f"v{layer}"])


def test_a_piece_of_the_other_kv_form_is_refused() -> None:
    plain, q8 = tiny_model(1), tiny_model(1, kv_dtype=kv_quant.STORAGE)
    piece = encode_piece(plain.model, plain.encode("some words"))
    with pytest.raises(ValueError, match="pieces are stored in the form"):
        assemble(q8.model, [piece], 50)


def test_assembled_prefix_gives_the_logits_of_a_chunkwise_prefill() -> None:
    """Drafter logits after the question: chunk KV assembly vs each chunk prefilled at its place in
    the prompt right after a copy of the header (header first, then the question over everything).
    fp32 K/V: the 8-bit form's moved keys are requantized (test_placed_keys_match_... bounds them)."""
    model = tiny_model(2, noise_from=1, noise=0.01)
    prompt = model.prompt(PASSAGES, QUESTION)
    header = prompt.header
    reference = model.model.new_cache(len(prompt) + 8)
    model.model.prefill(torch.tensor(header), reference)
    for start, tokens in zip(prompt.boundaries, prompt.pieces(), strict=True):
        read = _alone_at(model, header + tokens, start - len(header))
        mine, theirs = slice(start, start + len(tokens)), slice(len(header), len(header) + len(tokens))
        for layer in range(model.model.args.n_layers):
            reference.keys[layer][:, mine] = read.keys[layer][:, theirs]
            reference.values[layer][:, mine] = read.values[layer][:, theirs]
    reference.length = reference.next_position = len(prompt.prefix)
    expected = model.model.prefill(torch.tensor(prompt.suffix), reference)

    store = ChunkKV(Path("/nonexistent"), model.model, "key", header)  # nothing is read: every piece given here
    pieces = [store.header_kv(), *(encode_piece(model.model, p, after=header) for p in prompt.pieces())]
    hooks = PrefixCacheHooks(lambda m, prefix, capacity: assemble(m, pieces, capacity), lambda *a: None)
    cache, logits, restored = prefill(model.model, prompt, hooks, len(prompt) + 8)
    assert restored and cache.length == len(prompt)
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
    # ... while a plain prefill, where chunks see each other, and chunks read alone (no header
    # before them) are other contexts.
    plain = model.model.prefill(torch.tensor(prompt.tokens), model.model.new_cache(len(prompt) + 8))
    assert not torch.allclose(plain, expected, atol=1e-3)
    alone = [store.header_kv(), *(encode_piece(model.model, p) for p in prompt.pieces())]
    hooks = PrefixCacheHooks(lambda m, prefix, capacity: assemble(m, alone, capacity), lambda *a: None)
    assert not torch.allclose(prefill(model.model, prompt, hooks, len(prompt) + 8)[1], expected, atol=1e-3)


def test_pieces_are_tokenised_apart(pair) -> None:
    model = pair[0]
    one, two = model.prompt(PASSAGES[:2], QUESTION), model.prompt(PASSAGES[1:], QUESTION)
    assert one.pieces()[1] == two.pieces()[0] == model.piece_tokens(PASSAGES[1])
    assert one.header == two.header
    assert one.prefix == one.header + [t for p in one.pieces() for t in p]


@pytest.mark.parametrize("gamma", [1, 4])
def test_rapid_with_chunk_kv_returns_lc_tokens(pair, tmp_path: Path, gamma: int) -> None:
    target, drafter = pair
    long_prompt = target.prompt(["Some preamble that only the target reads.", *PASSAGES], QUESTION)
    rag_prompt = target.prompt(PASSAGES, QUESTION)
    settings = DecodingSettings(max_new_tokens=40, gamma=gamma, eta=0.0)
    lc = run_to_end(generate("lc", target, drafter, long_prompt, rag_prompt, settings))
    store = ChunkKV(tmp_path, drafter.model, PrefixCache(tmp_path / "kv", {}).model_key(drafter.model),
                    rag_prompt.header)
    ids = ["doc-000000", "doc-000003", "other-000000"]
    hooks = store.hooks(rag_prompt, ids)
    served: list[int] = []

    def load(model, prefix, capacity):
        cache = hooks.load(model, prefix, capacity)
        served.append(cache is not None)
        return cache

    out = run_to_end(generate("rapid", target, drafter, long_prompt, rag_prompt, settings,
                              rag_prefix=PrefixCacheHooks(load, hooks.save)))
    assert served == [True]
    assert out.token_ids == lc.token_ids
    assert out.stats.drafted > 0 and out.stats.accepted > 0
    assert out.stats.draft_context_tokens == len(rag_prompt)
    assert len(list((tmp_path / "chunk_kv").glob("*/*.safetensors"))) == 3  # built on demand, stored


def test_hooks_serve_only_their_own_prompt_and_drafter(pair, tmp_path: Path) -> None:
    target, drafter = pair
    prompt = drafter.prompt(PASSAGES, QUESTION)
    store = ChunkKV(tmp_path, drafter.model, "key", prompt.header)
    hooks = store.hooks(prompt, ["a-000000", "a-000001", "b-000000"])
    assert hooks.load(target.model, prompt.prefix, 500) is None  # another model
    assert hooks.load(drafter.model, prompt.prefix[:-1], 500) is None  # another prefix
    cache = hooks.load(drafter.model, prompt.prefix, 500)
    assert cache is not None and cache.length == len(prompt.prefix) and cache.capacity >= 500
    with pytest.raises(ValueError, match="chunk ids"):
        store.hooks(prompt, ["a-000000"])
    other = Prompt([7, *prompt.prefix], prompt.suffix, tuple(b + 1 for b in prompt.boundaries))
    with pytest.raises(ValueError, match="header"):  # its passages were read after another header
        store.hooks(other, ["a-000000", "a-000001", "b-000000"])


def test_a_passage_is_served_only_for_the_tokens_it_was_built_from(pair, tmp_path: Path) -> None:
    drafter = pair[1]
    first = drafter.prompt(PASSAGES[:1], QUESTION)
    store = ChunkKV(tmp_path, drafter.model, "key", first.header)
    store.hooks(first, ["a-000000"]).load(drafter.model, first.prefix, 100)
    edited = drafter.prompt([PASSAGES[0] + " (edited)"], QUESTION)  # same chunk id, other text
    cache = store.hooks(edited, ["a-000000"]).load(drafter.model, edited.prefix, 100)
    fresh = assemble(drafter.model, [store.header_kv(), encode_piece(drafter.model, edited.pieces()[0], edited.header)],
                     100)
    assert cache is not None
    for layer in range(drafter.model.args.n_layers):
        torch.testing.assert_close(cache.keys[layer][:, : cache.length], fresh.keys[layer][:, : cache.length])


def test_prune_removes_the_kv_of_deleted_chunks_for_every_drafter(tmp_path: Path) -> None:
    for model_dir in ("drafter-a", "drafter-b"):
        directory = tmp_path / "chunk_kv" / model_dir
        directory.mkdir(parents=True)
        for name in ("doc1-000000.aa", "doc1-000001.bb", "doc2-000000.cc"):
            (directory / f"{name}.safetensors").write_bytes(b"")
    assert prune(tmp_path, lambda: {"doc2-000000"}) == 4
    left = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.safetensors"))
    assert left == ["chunk_kv/drafter-a/doc2-000000.cc.safetensors", "chunk_kv/drafter-b/doc2-000000.cc.safetensors"]


def test_prompt_without_pieces_keeps_working() -> None:
    prompt = Prompt([1, 2, 3], [4])
    assert prompt.header == [1, 2, 3] and prompt.pieces() == []
