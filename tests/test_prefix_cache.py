"""The target's prefix cache: private copies, keys that cannot collide, room for the whole answer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import decoding.prefix_cache as prefix_cache_module
from decoding import kv_quant
from decoding.cache import KVCache
from decoding.generate import generate, run_to_end
from decoding.prefill import PrefixCacheHooks, prefill_parts
from decoding.prefix_cache import PrefixCache
from decoding.settings import DecodingSettings
from tests.tiny import random_prompt, tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model(1)


def _filled(model, prefix: list[int]) -> KVCache:
    cache = model.model.new_cache(len(prefix) + 8)
    model.model.prefill(torch.tensor(prefix), cache)
    return cache


def _same_prefix(a: KVCache, b: KVCache, n: int) -> bool:
    return all(torch.equal(x, y) for layer in range(len(a.keys))
               for x, y in zip(a.span(layer, 0, n), b.span(layer, 0, n), strict=True))


def test_every_load_is_a_private_copy(model, tmp_path: Path) -> None:
    """#14.2: the live stored cache was handed out, so one user's writes showed up in the next load."""
    prefix = random_prompt(60, seed=1).prefix
    reference = _filled(model, prefix)
    cache = PrefixCache(tmp_path, {})
    cache.save(model.model, prefix, reference.clone())
    first = cache.load(model.model, prefix, 100)
    assert first is not None
    model.model.forward(torch.tensor([1, 2, 3]), first)  # the caller answers a question
    for layer in range(len(first.keys)):
        first.keys[layer].fill_(7.0)  # ... and scribbles over its own cache
    second = cache.load(model.model, prefix, 100)
    assert second is not None and second is not first
    assert second.length == second.next_position == len(prefix)
    assert _same_prefix(second, reference, len(prefix))


def test_two_model_objects_with_one_weights_never_share_a_cache(model, tmp_path: Path) -> None:
    """#14.2: target and drafter loaded twice from one directory shared a key and one live cache;
    the drafter's load cropped the target's cache in the middle of its answer."""
    twin = tiny_model(1)  # same weights, another object (e.g. two specs naming one directory)
    prefix = random_prompt(60, seed=2).prefix
    cache = PrefixCache(tmp_path, {})
    cache.save(model.model, prefix, _filled(model, prefix))
    target_cache = cache.load(model.model, prefix, 100)
    assert target_cache is not None
    model.model.forward(torch.tensor([5, 6, 7, 8]), target_cache)
    drafter_cache = cache.load(twin.model, prefix, 100)  # same weights: the stored values are valid
    assert drafter_cache is not None and drafter_cache is not target_cache
    assert target_cache.length == len(prefix) + 4  # untouched by the twin's load


def test_models_without_an_id_are_told_apart_by_their_weights(tmp_path: Path) -> None:
    """#14.2: without a model id the key was repr(model.args): any two models of one shape collided."""
    a, b = tiny_model(1), tiny_model(3)  # same config, different weights
    prefix = random_prompt(40, seed=3).prefix
    cache = PrefixCache(tmp_path, {})
    assert cache.key(a.model, prefix) != cache.key(b.model, prefix)
    cache.save(a.model, prefix, _filled(a, prefix))
    assert cache.load(b.model, prefix, 64) is None
    assert PrefixCache(tmp_path, {}).load(b.model, prefix, 64) is None  # nor from disk


def test_kv_written_by_other_engine_code_is_not_served(model, tmp_path: Path, monkeypatch) -> None:
    """#14.2: the key held no hash of the engine code, kernel or torch: old KV was served silently."""
    prefix = random_prompt(40, seed=4).prefix
    PrefixCache(tmp_path, {}).save(model.model, prefix, _filled(model, prefix))
    assert PrefixCache(tmp_path, {}).load(model.model, prefix, 64) is not None
    monkeypatch.setattr(prefix_cache_module, "engine_stamp", lambda: "another version of the engine")
    assert PrefixCache(tmp_path, {}).load(model.model, prefix, 64) is None


def test_the_engine_stamp_covers_what_kv_sources_import() -> None:
    """The stamp hashes only the sources that decide KV values; a module they import must be one of them."""
    import re

    engine_dir = prefix_cache_module.ENGINE_DIR
    stale = [pattern for pattern in prefix_cache_module.KV_SOURCES if not any(engine_dir.glob(pattern))]
    assert not stale, f"the engine stamp lists {stale}, which match no file (renamed or moved?)"
    covered = {p.name for pattern in prefix_cache_module.KV_SOURCES
               for p in engine_dir.glob(pattern) if p.suffix == ".py"}
    for name in covered:
        source = (engine_dir / name).read_text()
        imported = {f"{m}.py" for m in re.findall(r"^from decoding\.(\w+) import", source, re.MULTILINE)}
        assert imported <= covered, f"{name} imports {imported - covered}, which the engine stamp does not hash"


def test_every_writer_has_its_own_temp_file(model, tmp_path: Path, monkeypatch) -> None:
    """#14.2: `.partial` was one name per key, so two writers of one key wrote into the same file."""
    prefix = random_prompt(40, seed=5).prefix
    filled = _filled(model, prefix)
    written: list[str] = []
    real_save_file = prefix_cache_module.save_file

    def recording_save_file(tensors, filename, metadata=None):
        written.append(str(filename))
        return real_save_file(tensors, filename, metadata=metadata)

    monkeypatch.setattr(prefix_cache_module, "save_file", recording_save_file)
    PrefixCache(tmp_path, {}).save(model.model, prefix, filled)
    PrefixCache(tmp_path, {}).save(model.model, prefix, filled)
    assert len(written) == 2 and written[0] != written[1]
    assert all(Path(p).parent == tmp_path for p in written)
    # Only the stored prefix is left: no temp file, and no unread sidecar (#14.7).
    assert [p.suffix for p in tmp_path.iterdir()] == [".safetensors"]


@pytest.mark.parametrize("from_disk", [False, True])
def test_a_restored_cache_holds_the_whole_answer(model, tmp_path: Path, from_disk: bool) -> None:
    """#14.7: a cache restored from disk had 1024 spare slots, so a longer answer copied the whole
    cache (1.5x) mid-decode. The capacity the session asks for is there from the start."""
    prompt, rag = random_prompt(80, seed=6), random_prompt(20, seed=7)
    settings = DecodingSettings(max_new_tokens=1100, gamma=3)
    PrefixCache(tmp_path, {}).save(model.model, prompt.prefix, _filled(model, prompt.prefix))
    store = PrefixCache(tmp_path, {})
    if not from_disk:
        assert store.load(model.model, prompt.prefix, 10) is not None  # now held in memory
    handed_out: list[tuple[KVCache, torch.Tensor]] = []

    def load(m, prefix, capacity):
        cache = store.load(m, prefix, capacity)
        assert cache is not None and cache.capacity >= capacity
        handed_out.append((cache, cache.keys[0]))
        return cache

    out = run_to_end(generate("lc", model, None, prompt, rag, settings, PrefixCacheHooks(load, store.save)))
    assert out.stats.prefix_cached_tokens == len(prompt.prefix)
    assert out.stats.generated == settings.max_new_tokens  # tiny models have no stop token
    (cache, first_keys), = handed_out
    assert cache.keys[0] is first_keys  # never reallocated while decoding


# ------------------------------------------------ document prefixes: extended on add, cut on delete

DOCS = ["first document " * 30, "second document, a little longer " * 25, "third one " * 40, "fourth " * 20]


def _prompt(model, docs: list[str]):
    return model.prompt(docs, "What do the documents say?")


def _scratch(model, prompt) -> KVCache:
    """What generate computes without any cache: the prefix part by part."""
    cache = model.model.new_cache(len(prompt.prefix) + 8)
    prefill_parts(model.model, prompt.prefix, prompt.cuts(), cache)
    return cache


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_an_added_document_extends_the_cached_prefix(tmp_path: Path, dtype: torch.dtype) -> None:
    model = tiny_model(1, dtype)
    before, after = _prompt(model, DOCS[:2]), _prompt(model, DOCS[:3])
    cache = PrefixCache(tmp_path, {})
    cache.save(model.model, before.prefix, _scratch(model, before), before.cuts())
    done: list[tuple[int, int]] = []
    hooks = PrefixCache(tmp_path, {}).hooks(after.cuts(), progress=lambda d, t: done.append((d, t)))
    extended = hooks.load(model.model, after.prefix, len(after) + 50)
    assert extended is not None and extended.length == len(after.prefix)
    new_tokens = len(after.prefix) - len(before.prefix)
    assert done[-1] == (new_tokens, new_tokens)  # only the new document was read
    assert _same_prefix(extended, _scratch(model, after), len(after.prefix))  # bit for bit
    settings = DecodingSettings(max_new_tokens=30)
    reopened = PrefixCache(tmp_path, {})  # the extended prefix was stored too
    assert reopened.contains(model.model, after.prefix)
    from_cache = run_to_end(generate("lc", model, None, after, after, settings, reopened.hooks(after.cuts())))
    from_scratch = run_to_end(generate("lc", model, None, after, after, settings))
    assert from_cache.stats.prefix_cached_tokens == len(after.prefix)
    assert from_cache.token_ids == from_scratch.token_ids


def test_prefix_cached_tokens_count_only_what_came_from_the_cache(tmp_path: Path) -> None:
    """#28.4: a prefix extended by an added document counted whole as cached."""
    model = tiny_model(1)
    before, after = _prompt(model, DOCS[:2]), _prompt(model, DOCS[:3])
    cache = PrefixCache(tmp_path, {})
    cache.save(model.model, before.prefix, _scratch(model, before), before.cuts())
    extended = run_to_end(generate("lc", model, None, after, after, DecodingSettings(max_new_tokens=4),
                                   cache.hooks(after.cuts())))
    assert extended.stats.prefix_cached_tokens == len(before.prefix)  # the third document was prefilled
    again = run_to_end(generate("lc", model, None, after, after, DecodingSettings(max_new_tokens=4),
                                cache.hooks(after.cuts())))
    assert again.stats.prefix_cached_tokens == len(after.prefix)  # now stored whole
    cold = run_to_end(generate("lc", model, None, after, after, DecodingSettings(max_new_tokens=4),
                               PrefixCache(tmp_path / "empty", {}).hooks(after.cuts())))
    assert cold.stats.prefix_cached_tokens == 0


def test_a_deleted_document_recomputes_from_the_first_changed_one(model, tmp_path: Path) -> None:
    full, without_second = _prompt(model, DOCS), _prompt(model, [DOCS[0], *DOCS[2:]])
    cache = PrefixCache(tmp_path, {})
    cache.save(model.model, full.prefix, _scratch(model, full), full.cuts())
    restored = cache.longest(model.model, without_second.prefix, without_second.cuts(), 10)
    assert restored is not None and restored.length == without_second.cuts()[1]  # header + first document
    done: list[tuple[int, int]] = []
    cut = cache.extend(model.model, without_second.prefix, without_second.cuts(), 10, lambda d, t: done.append((d, t)))
    assert cut is not None
    assert done[-1][1] == len(without_second.prefix) - without_second.cuts()[1]  # documents 3 and 4, again
    assert _same_prefix(cut, _scratch(model, without_second), len(without_second.prefix))


def test_nothing_is_restored_when_the_first_document_changed(model, tmp_path: Path) -> None:
    cache = PrefixCache(tmp_path, {})
    old = _prompt(model, DOCS[:2])
    cache.save(model.model, old.prefix, _scratch(model, old), old.cuts())
    new = _prompt(model, ["another first document " * 10, DOCS[1]])
    restored = cache.longest(model.model, new.prefix, new.cuts(), 10)
    assert restored is not None and restored.length == len(new.header)  # only the header is shared
    other = tiny_model(3)
    assert cache.longest(other.model, old.prefix, old.cuts(), 10) is None  # another model shares nothing


# --------------------------------------------------------------------------- the 8-bit KV form


def _stored_data_bytes(path: Path) -> int:
    """A safetensors file's tensor bytes: its size less the 8-byte length and the JSON header."""
    raw = path.read_bytes()
    return len(raw) - 8 - int.from_bytes(raw[:8], "little")


@pytest.mark.parametrize("from_disk", [False, True])
def test_an_8bit_prefix_round_trips_its_bytes(tmp_path: Path, from_disk: bool) -> None:
    q8 = tiny_model(1, kv_dtype=kv_quant.STORAGE)
    prefix = random_prompt(600, seed=8).prefix  # past a KV_BLOCK: a shared base and own slots
    filled = _filled(q8, prefix)
    PrefixCache(tmp_path, {}).save(q8.model, prefix, filled)
    store = PrefixCache(tmp_path, {})
    if not from_disk:
        store.save(q8.model, prefix, filled)
    loaded = store.load(q8.model, prefix, 700)
    assert loaded is not None and loaded.quantized and loaded.head_dim == q8.model.args.head_dim
    assert loaded.offset == 512 and loaded.base_keys[0].dtype == kv_quant.STORAGE
    assert _same_prefix(loaded, filled, len(prefix))
    # ... and it decodes on: the next token's logits are those of the cache that was stored.
    token = torch.tensor([3])
    assert torch.equal(q8.model.forward(token, loaded), q8.model.forward(token, filled.clone()))


def test_a_prefix_of_one_kv_form_is_not_served_to_the_other(tmp_path: Path) -> None:
    """The same model object, its caches switched to the 8-bit form: the fp32 prefix it stored before
    is not its prefix any more (and the other way round), in memory, on disk, or as a document run."""
    loaded = tiny_model(1)
    prompt = random_prompt(60, seed=9)
    store = PrefixCache(tmp_path, {})
    store.save(loaded.model, prompt.prefix, _filled(loaded, prompt.prefix), prompt.cuts())
    loaded.model.kv_dtype = kv_quant.STORAGE
    for cache in (store, PrefixCache(tmp_path, {})):
        assert not cache.contains(loaded.model, prompt.prefix)
        assert cache.load(loaded.model, prompt.prefix, 64) is None
        assert cache.longest(loaded.model, prompt.prefix, prompt.cuts(), 64) is None
    store.save(loaded.model, prompt.prefix, _filled(loaded, prompt.prefix), prompt.cuts())
    served = store.load(loaded.model, prompt.prefix, 64)
    assert served is not None and served.quantized
    loaded.model.kv_dtype = None
    assert store.load(loaded.model, prompt.prefix, 64) is not None  # its own fp32 prefix, still there
    assert not store.load(loaded.model, prompt.prefix, 64).quantized


def test_stored_bytes_per_token_follow_the_kv_form(tmp_path: Path) -> None:
    """On disk and in the size estimates: 8-bit K/V take row_bytes / (2 head_dim) of bf16's bytes."""
    forms = {"bf16": tiny_model(1, torch.bfloat16), "q8": tiny_model(1, torch.bfloat16, kv_dtype=kv_quant.STORAGE)}
    prefix = random_prompt(100, seed=10).prefix
    on_disk, estimated = {}, {}
    for name, loaded in forms.items():
        store = PrefixCache(tmp_path / name, {})
        store.save(loaded.model, prefix, _filled(loaded, prefix))
        on_disk[name] = _stored_data_bytes(store.store.path(store.key(loaded.model, prefix)))
        estimated[name] = store.bytes_per_1k_tokens(loaded.model)
    head_dim = forms["q8"].model.args.head_dim
    assert on_disk["q8"] * 2 * head_dim == on_disk["bf16"] * kv_quant.row_bytes(head_dim)
    assert estimated["q8"] * 2 * head_dim == estimated["bf16"] * kv_quant.row_bytes(head_dim)
    assert on_disk["bf16"] * 1000 == estimated["bf16"] * len(prefix)
