"""`ask eval --split tune|report`: one half of a labelled set, chosen by the questions' split field."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from app.errors import CliError
from app.eval.runner import QAItem, check_sources, evidence_row, load_questions, parser, select_split
from retrieval.types import Citation

REPO = Path(__file__).resolve().parent.parent

FIXTURE = [
    {"id": "a1", "question": "Q1?", "answers": ["x"], "source": "a.pdf", "page": 3, "hops": 1, "split": "tune"},
    {"id": "b1", "question": "Q2?", "answers": ["y"], "source": "b.md", "section": "Usage", "hops": 2,
     "split": "report"},
    {"id": "a2", "question": "Q3?", "answers": ["z"], "source": "a.pdf", "page": 4, "hops": 1, "split": "tune"},
    {"id": "c1", "question": "Q4?", "answers": ["w"], "source": "c.html", "section": "Intro", "split": "report"},
]


def _write(tmp_path: Path, records: list[dict]) -> Path:
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_split_selects_one_half_in_file_order(tmp_path: Path) -> None:
    path = _write(tmp_path, FIXTURE)
    items = load_questions(path)
    assert [i.id for i in select_split(items, "tune", path)] == ["a1", "a2"]
    report = select_split(items, "report", path)
    assert [i.id for i in report] == ["b1", "c1"]
    assert report[0].section == "Usage" and report[0].hops == 2 and report[0].page is None
    assert select_split(items, None, path) == items  # no --split: every question


def test_split_refuses_unlabelled_questions_and_unknown_halves(tmp_path: Path) -> None:
    unlabelled = _write(tmp_path, [*FIXTURE, {"id": "d1", "question": "Q5?", "answers": ["v"]}])
    with pytest.raises(CliError, match=r'without a "split" field.*d1'):
        select_split(load_questions(unlabelled), "tune", unlabelled)
    odd = _write(tmp_path, [*FIXTURE, {"id": "d1", "question": "Q5?", "answers": ["v"], "split": "test"}])
    with pytest.raises(CliError, match=r"unknown split value.*'test'"):
        select_split(load_questions(odd), "report", odd)
    one_half = _write(tmp_path, FIXTURE[:1])
    with pytest.raises(CliError, match="holds no report questions"):
        select_split(load_questions(one_half), "report", one_half)


def test_split_option_accepts_only_the_two_halves() -> None:
    assert parser().parse_args(["--split", "tune"]).split == "tune"
    with pytest.raises(SystemExit):
        parser().parse_args(["--split", "all"])


def test_questions_about_documents_missing_from_the_index_are_refused(tmp_path: Path) -> None:
    items = load_questions(_write(tmp_path, FIXTURE))
    check_sources(items[:1], ["a.pdf", "other.pdf"])
    with pytest.raises(CliError, match=r"not in the index: b\.md, c\.html"):
        check_sources(items, ["a.pdf"])


def test_evidence_of_a_section_labelled_question_is_matched_by_section() -> None:
    from types import SimpleNamespace

    item = QAItem("b1", "Q?", ["y"], source="b.md", section="Usage")

    def cited(*sections: str) -> SimpleNamespace:
        citations = [Citation("b.md", None, s, "...", 1.0, read=(s == "Usage")) for s in sections]
        return SimpleNamespace(citations=citations, reading=None)

    found = evidence_row(item, cited("Intro", "Usage"))
    assert found["page_retrieved"] is True and found["page_read"] is True
    assert evidence_row(item, cited("Intro"))["page_retrieved"] is False
    unlabelled = QAItem("q", "Q?", ["y"])
    assert evidence_row(unlabelled, cited("Usage"))["page_retrieved"] is None


def test_ask_eval_split_error_is_one_clear_line(tmp_path: Path) -> None:
    questions = _write(tmp_path, [{"id": "q", "question": "Q?", "answers": ["x"]}])
    done = subprocess.run([sys.executable, "-m", "cli.main", "eval", "--questions", str(questions),
                           "--split", "report"], capture_output=True, text=True,
                          env=os.environ | {"RAPIDQA_HOME": str(tmp_path)}, timeout=120, cwd=REPO)
    assert done.returncode == 1
    assert '"split" field' in done.stderr and "Traceback" not in done.stderr


DOC = """# Harbour rules

The harbour master of Port Quill is Ada Brightwater.
Boats must moor at the eastern pier after sunset.

# Tides

High tide at Port Quill is announced with three bells.
"""


@pytest.mark.real_models
@pytest.mark.timeout(600)
def test_ask_eval_split_runs_one_half_and_prints_intervals(tmp_path: Path, small_model_dir: Path) -> None:
    from tests.conftest import real_models_dir

    doc = tmp_path / "harbour.md"
    doc.write_text(DOC)
    questions = _write(tmp_path, [
        {"id": "t1", "question": "Who is the harbour master of Port Quill?", "answers": ["Ada Brightwater"],
         "source": "harbour.md", "section": "Harbour rules", "position": "beginning", "split": "tune"},
        {"id": "r1", "question": "How many bells announce high tide at Port Quill?", "answers": ["three"],
         "source": "harbour.md", "section": "Tides", "position": "end", "split": "report"},
        {"id": "r2", "question": "At which pier must boats moor after sunset?", "answers": ["eastern"],
         "source": "harbour.md", "section": "Harbour rules", "position": "middle", "split": "report"},
    ])
    out = tmp_path / "out"
    env = os.environ | {"RAPIDQA_HOME": str(tmp_path / "home"), "RAPIDQA_MODELS_DIR": str(real_models_dir())}
    done = subprocess.run(
        [sys.executable, "-m", "cli.main", "eval", "--docs", str(doc), "--questions", str(questions),
         "--split", "report", "--methods", "lc,rag", "--fast", "--max-new-tokens", "12", "--no-warmup",
         "--index", str(tmp_path / "index"), "--out", str(out)],
        capture_output=True, text=True, env=env, timeout=580, cwd=REPO,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert [q["id"] for q in results["questions"]] == ["r1", "r2"]  # the report half only, in file order
    assert {r["id"] for r in results["rows"]} == {"r1", "r2"}
    assert all(r["page_retrieved"] is not None for r in results["rows"])  # section labels are matched
    intervals = {record["method"]: record for record in results["intervals"]}
    assert intervals["lc"]["vs_lc"] is None and intervals["rag"]["vs_lc"]["n"] == 2
    assert "EM 95%" in done.stdout and "dcontains vs LC" in done.stdout
