"""A one-question `ask` prepares what its answer needs beside the target's load (app/warm_up.py):
the drafter loads in a thread of its own, at the same time as the target, and the embedder and the
models' keys are ready before the answer asks for them."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

import app.models as models
from app.config import ModelSettings, Settings
from app.options import engine_and_index
from app.pipeline import Engine
from cli.main import question_parser
from retrieval.index import HybridIndex
from retrieval.types import RetrievalSettings
from tests.retrieval_fixtures import HashEmbedder
from tests.tiny import tiny_model

LOAD_S = 0.4


class Loads:
    """A stand-in for load_model that takes LOAD_S and records who loaded what, and when."""

    def __init__(self) -> None:
        self.seen: dict[str, tuple[str, float, float]] = {}
        self.embedder_loaded_by: list[str] = []  # thread names

    def __call__(self, spec, directory, dtype, device, quantized=False, kv_dtype=None):  # type: ignore[no-untyped-def]
        start = time.perf_counter()
        time.sleep(LOAD_S)
        model = (tiny_model(1, kv_dtype=kv_dtype) if spec == "tiny-target"
                 else tiny_model(2, noise_from=1, noise=0.01, kv_dtype=kv_dtype))
        self.seen[spec] = (threading.current_thread().name, start, time.perf_counter())
        return model


class LoadedEmbedder(HashEmbedder):
    def __init__(self, loaded_by: list[str]) -> None:
        self.loaded_by = loaded_by

    def load(self) -> None:
        self.loaded_by.append(threading.current_thread().name)


@pytest.fixture
def loads(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Loads:
    fake = Loads()
    monkeypatch.setattr(models, "load_model", fake)
    monkeypatch.setattr(models, "resolve_model", lambda spec, directory, log=None, dense=False: tmp_path / spec)
    monkeypatch.setattr(models, "Embedder", lambda: LoadedEmbedder(fake.embedder_loaded_by))
    return fake


def ask_setup(tmp_path: Path, method: str, monkeypatch: pytest.MonkeyPatch) -> Engine:
    """What `ask QUESTION --index DIR --method METHOD` does before it answers; then its warm-up ends."""
    monkeypatch.setenv("RAPIDQA_HOME", str(tmp_path))
    index_dir = tmp_path / "index"
    HybridIndex(index_dir, RetrievalSettings(), lambda text: list(text.encode()), HashEmbedder()).close()
    args = question_parser().parse_args(["What?", "--index", str(index_dir), "--method", method,
                                         "--target", "tiny-target", "--drafter", "tiny-drafter"])
    _, engine, _ = engine_and_index(args)
    for thread in threading.enumerate():
        if thread.name.startswith("rapidqa-warm-up"):
            thread.join(timeout=30)
    return engine


def test_rapid_loads_its_drafter_beside_the_target_before_the_question_is_answered(
        loads: Loads, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = ask_setup(tmp_path, "rapid", monkeypatch)
    assert "tiny-drafter" in loads.seen, "the drafter was left for the answer to load"
    drafter_thread, drafter_start, drafter_end = loads.seen["tiny-drafter"]
    target_thread, target_start, target_end = loads.seen["tiny-target"]
    assert drafter_thread != target_thread
    assert drafter_start < target_end and target_start < drafter_end, "the two loads ran one after the other"
    # The drafter's chunk KV store name, which the answer's path computed before its first token: ready.
    assert engine.model("tiny-drafter").model in engine.prefix_cache._fingerprints
    assert loads.embedder_loaded_by and loads.embedder_loaded_by[0] != threading.current_thread().name


def test_lc_loads_no_drafter(loads: Loads, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ask_setup(tmp_path, "lc", monkeypatch)
    assert set(loads.seen) == {"tiny-target"}
    assert loads.embedder_loaded_by


def test_one_model_is_loaded_once_when_two_threads_ask_for_it(loads: Loads, tmp_path: Path) -> None:
    engine = models.Models(Settings(home=tmp_path, models=ModelSettings(target="tiny-target", drafter="tiny-drafter")))
    got: list[object] = []
    threads = [threading.Thread(target=lambda: got.append(engine.model("tiny-drafter"))) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(got) == 3 and all(model is got[0] for model in got)
    assert list(loads.seen) == ["tiny-drafter"]
