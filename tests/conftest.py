"""Shared fixtures: where the real embedded models are, and engines built on them."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.options import quiet_environment
from tests.resources import LARGE, SMALL, real_models_dir, require_model

quiet_environment()  # before any test imports a library that reads these

REPO = Path(__file__).resolve().parent.parent
__all__ = ["LARGE", "SMALL", "real_models_dir", "require_model"]  # test modules import these from here


@pytest.fixture(scope="session")
def small_model_dir() -> Path:
    return require_model(SMALL)


@pytest.fixture(scope="session")
def large_model_dir() -> Path:
    return require_model(LARGE)
