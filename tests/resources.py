"""What `make test` prepares (the real models, Debian's Chromium), and what a test does without it.

On a developer's machine a missing resource skips the test, saying how to prepare it. Under CI
(`CI` set to true/1, or `RAPIDQA_CI=1`) the same absence fails the test: `make test` prepares both,
so a skip there would mean a whole class of tests silently did not run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import NoReturn

import pytest

SMALL = "qwen2.5-coder-0.5b"
LARGE = "qwen2.5-coder-1.5b"


def in_ci() -> bool:
    """CI=true/1 (GitHub Actions, GitLab and most runners set it) or RAPIDQA_CI=1 (.ci/run sets it)."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1") or os.environ.get("RAPIDQA_CI", "") == "1"


def missing(reason: str) -> NoReturn:
    """Skip the test for a resource that is not prepared; under CI, fail it."""
    if in_ci():
        pytest.fail(f"{reason}; under CI `make test` prepares it, so its absence is a failure", pytrace=False)
    pytest.skip(reason)


def real_models_dir() -> Path:
    """RAPIDQA_MODELS_DIR, else $RAPIDQA_HOME/models, else ~/.cache/rapidqa/models (as `make test` prepares it)."""
    if os.environ.get("RAPIDQA_MODELS_DIR"):
        return Path(os.environ["RAPIDQA_MODELS_DIR"]).expanduser()
    if os.environ.get("RAPIDQA_HOME"):
        return Path(os.environ["RAPIDQA_HOME"]).expanduser() / "models"
    return Path.home() / ".cache" / "rapidqa" / "models"


def require_model(name: str) -> Path:
    """A prepared model's directory, or skip (fail under CI) saying where it was looked for."""
    from app.registry import is_ready

    path = real_models_dir() / name
    if not is_ready(path):
        missing(f"{name} is not prepared in {path.parent} (set RAPIDQA_MODELS_DIR, or run `make models-test`)")
    return path


def require_chromium() -> Path:
    """Chromium found on PATH, as the Makefile's `browser` target looks for it."""
    found = shutil.which("chromium")
    if found is None:
        missing("chromium is not on PATH (`make browser` installs Debian's)")
    return Path(found)


def stop_process(process: subprocess.Popen, timeout: float = 30) -> None:
    """Terminate a server a test started; kill it when it does not stop within `timeout` seconds."""
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
