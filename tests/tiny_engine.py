"""An Engine on the tiny target/drafter pair and the hash embedder: the app's whole path in seconds."""

from __future__ import annotations

from pathlib import Path

from app.config import Limits, ModelSettings, Settings
from app.pipeline import Engine
from decoding.settings import DecodingSettings
from retrieval.types import RetrievalSettings
from tests.retrieval_fixtures import HashEmbedder
from tests.tiny import tiny_model


def tiny_engine(home: Path, decoding: DecodingSettings, **settings: object) -> Engine:
    """settings: further Settings fields (e.g. rag_read)."""
    engine = Engine(Settings(
        home=home, models=ModelSettings(target="tiny-target", drafter="tiny-drafter"),
        retrieval=RetrievalSettings(chunk_tokens=64, budget_min_tokens=150, budget_fraction=0.0),
        decoding=decoding, limits=Limits(max_new_tokens=32), **settings,  # type: ignore[arg-type]
    ), log=lambda _: None)
    engine._models["tiny-target"] = tiny_model(1)
    engine._models["tiny-drafter"] = tiny_model(2, noise_from=1, noise=0.01)
    engine._embedder = HashEmbedder()  # type: ignore[assignment]
    return engine
