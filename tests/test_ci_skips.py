"""Under CI a missing prepared resource (real model, Chromium) fails the run instead of skipping.

Runs pytest in a subprocess on a small test file that asks for each resource while none is there.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# The helpers the real-model and browser tests call, each asked for what is not there.
PROBE = '''
from pathlib import Path

from tests.conftest import require_model
from tests.ui_helpers import chromium, small_model


def test_model() -> None:
    require_model("qwen2.5-coder-0.5b")


def test_ui_model() -> None:
    small_model()


def test_chromium(tmp_path: Path) -> None:
    with chromium(tmp_path / "profile"):
        pass
'''


def run_probe(tmp_path: Path, **ci: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "test_probe.py").write_text(PROBE)
    (tmp_path / "models").mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "RAPIDQA_CI", "RAPIDQA_HOME")}
    env |= {"RAPIDQA_MODELS_DIR": str(tmp_path / "models"), "PATH": str(tmp_path / "bin"),
            "PYTHONPATH": str(REPO), **ci}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "--rootdir", str(tmp_path),
         str(tmp_path / "test_probe.py")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )


@pytest.mark.parametrize("ci", [{"CI": "true"}, {"CI": "1"}, {"RAPIDQA_CI": "1"}])
def test_under_ci_a_missing_resource_fails_the_run(tmp_path: Path, ci: dict[str, str]) -> None:
    result = run_probe(tmp_path, **ci)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "3 failed" in result.stdout, result.stdout
    assert "under CI `make test` prepares it" in result.stdout


def test_outside_ci_a_missing_resource_skips_saying_why(tmp_path: Path) -> None:
    result = run_probe(tmp_path, CI="false")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 skipped" in result.stdout, result.stdout
    assert f"is not prepared in {tmp_path / 'models'}" in result.stdout
    assert "chromium is not on PATH" in result.stdout


def test_ci_runs_make_test_under_ci() -> None:
    lines = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    commands = [line for line in lines if line and not line.startswith("#")]
    assert "make test" in commands and "export RAPIDQA_CI=1" in commands
    assert commands.index("export RAPIDQA_CI=1") < commands.index("make test")
