"""`ask` end to end with the real embedded models, and its error paths."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from app.presets import PASSAGES
from tests.conftest import real_models_dir
from tests.docs import pdf_excerpt

DEMO_QUESTION = (Path(__file__).resolve().parent.parent / "data" / "demo_question.txt").read_text().strip()


def ask(*args: str, home: Path, timeout: int = 900) -> subprocess.CompletedProcess[str]:
    env = os.environ | {"RAPIDQA_HOME": str(home), "RAPIDQA_MODELS_DIR": str(real_models_dir())}
    return subprocess.run([sys.executable, "-m", "cli.main", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


def test_help_documents_every_option(tmp_path: Path) -> None:
    done = ask("--help", home=tmp_path)
    assert done.returncode == 0
    for option in ("--docs", "--index", "--method", "--max-new-tokens", "--temperature", "--json", "--compare",
                   "--eta", "--gamma", "--target", "--drafter", "serve", "eval", "bench"):
        assert option in done.stdout, option


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["q?", "--docs", "missing.pdf"], "no such file"),
        (["q?"], "no documents"),
        (["q?", "--index", "nowhere"], "is not an index"),
        (["q?", "--docs", "x.pdf", "--method", "fastest"], "invalid choice"),
    ],
)
def test_errors_exit_nonzero_with_one_clear_line(tmp_path: Path, args: list[str], message: str) -> None:
    done = ask(*args, home=tmp_path)
    assert done.returncode != 0
    assert message in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.real_models
def test_ask_answers_from_a_real_pdf_with_the_default_pair(tmp_path: Path, large_model_dir: Path,
                                                         small_model_dir: Path) -> None:
    pdf = pdf_excerpt([14, 15, 16], tmp_path / "fixed-width.pdf")
    index = tmp_path / "index"
    done = ask(DEMO_QUESTION, "--docs", str(pdf), "--index", str(index), "--max-new-tokens", "48", "--json",
               home=tmp_path / "home")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert "read.fwf" in result["answer"]
    assert result["sources"] and result["sources"][0]["document"] == "fixed-width.pdf"
    assert any(s["page"] == 2 for s in result["sources"])  # the excerpt's page 2 is R-data's page 15
    stats = result["stats"]
    assert stats["method"] == "rapid" and stats["generated"] > 0 and stats["drafted"] > 0
    for key in ("acceptance_rate", "mean_accepted_length", "prefill_s", "decode_s", "decode_tokens_per_s"):
        assert stats[key] is not None, key

    # Streaming text mode, from the persisted index alone: no re-ingest, prefix from the cache.
    again = ask(DEMO_QUESTION, "--index", str(index), "--max-new-tokens", "48", "--method", "lc",
                home=tmp_path / "home")
    assert again.returncode == 0, again.stderr
    assert "read.fwf" in again.stdout
    assert "Sources:" in again.stdout and "fixed-width.pdf, p. 2" in again.stdout
    assert "acceptance rate" in again.stdout and "tokens/s" in again.stdout
    assert "from the prefix cache" in again.stdout

    # The passages mode: the target drafts for itself from its retrieved passages (their chunk
    # KV built now: ingest builds only the default drafter's), eta > 0.
    best = ask(DEMO_QUESTION, "--index", str(index), "--max-new-tokens", "48", "--mode", "passages", "--json",
               home=tmp_path / "home")
    assert best.returncode == 0, best.stderr
    result = json.loads(best.stdout)
    assert "read.fwf" in result["answer"]
    assert result["stats"]["method"] == PASSAGES.method and result["stats"]["drafted"] > 0
    assert "Target reading passages" in best.stderr  # the on-demand chunk KV shows progress
