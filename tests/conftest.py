"""Shared fixtures: where the real embedded models are, and engines built on them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from app.options import quiet_environment

quiet_environment()  # before any test imports a library that reads these

REPO = Path(__file__).resolve().parent.parent
SMALL = "qwen2.5-coder-0.5b"
LARGE = "qwen2.5-coder-1.5b"


def real_models_dir() -> Path:
    if "RAPIDQA_MODELS_DIR" in os.environ:
        return Path(os.environ["RAPIDQA_MODELS_DIR"])
    home = os.environ.get("RAPIDQA_HOME")
    return Path(home) / "models" if home else Path.home() / ".cache" / "rapidqa" / "models"


def require_model(name: str) -> Path:
    from app.registry import is_ready

    path = real_models_dir() / name
    if not is_ready(path):
        pytest.skip(f"{name} is not prepared in {path.parent} (run `make models-test`)")
    return path


@pytest.fixture(scope="session")
def small_model_dir() -> Path:
    return require_model(SMALL)


@pytest.fixture(scope="session")
def large_model_dir() -> Path:
    return require_model(LARGE)
