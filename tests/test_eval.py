"""`ask eval`: the scoring functions, the shipped QA set, and one small end-to-end run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pypdf
import pytest

import app.eval.runner as runner
from app.errors import CliError
from app.eval.reporting import format_table, write_report
from app.eval.runner import QAItem, load_questions, method_runs, run_eval
from app.eval.scoring import (
    contains_answer,
    exact_match,
    first_sentence,
    lead_contains,
    normalize,
    summarize,
    token_f1,
)
from decoding.settings import DecodingSettings
from tests.conftest import real_models_dir
from tests.docs import SAMPLE_PDF, pdf_excerpt
from tests.retrieval_fixtures import write

REPO = Path(__file__).resolve().parent.parent
QA = REPO / "data" / "qa.jsonl"

# ------------------------------------------------------------------------------------------- scoring


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The  Answer is `read.table()`.", "answer is readtable"),
        ("An apple, a pear; the end!", "apple pear end"),
        ("‘UTF-16LE’ “quoted”", "utf16le quoted"),
        ("  \n\t ", ""),
        ("Theory and anthem", "theory and anthem"),  # articles only as whole words
    ],
)
def test_normalize(text: str, expected: str) -> None:
    assert normalize(text) == expected


def test_exact_match_ignores_case_punctuation_and_articles() -> None:
    assert exact_match("The scan function.", ["scan function"])
    assert exact_match("`read.table()`", ["read.table"])
    assert exact_match("ripley", ["Brian Ripley", "Ripley"])
    assert not exact_match("scan is the function", ["scan"])
    assert not exact_match("anything", [])


def test_token_f1_takes_the_best_acceptable_answer() -> None:
    assert token_f1("Brian Ripley", ["Brian Ripley"]) == 1.0
    assert token_f1("Ripley wrote it", ["Brian Ripley", "Ripley"]) == pytest.approx(0.5)  # p=1/3, r=1
    assert token_f1("Brian Ripley wrote it", ["Brian Ripley"]) == pytest.approx(2 * 0.5 * 1 / 1.5)
    assert token_f1("nothing shared", ["scan"]) == 0.0
    assert token_f1("", ["scan"]) == 0.0
    assert token_f1("", [""]) == 1.0


def test_contains_answer_needs_whole_tokens() -> None:
    assert contains_answer("The primary function is `scan`.", ["scan"])
    assert contains_answer("It was written by Brian Ripley in 2000.", ["Brian Ripley"])
    assert contains_answer("Use WRITE.CSV()", ["write.csv"])
    assert not contains_answer("Use write.csv2 instead", ["write.csv"])  # a different function
    assert not contains_answer("versions 5 to 112", ["12"])
    assert not contains_answer("Ripley Brian", ["Brian Ripley"])  # order matters
    assert not contains_answer("anything", ["!!!"])  # an answer that normalises away never matches


def test_lead_scores_what_the_answer_commits_to_first() -> None:
    assert lead_contains("The primary function is `scan`. It reads text files.", ["scan"])
    assert lead_contains("Use read.table() for tables", ["read.table"])  # a dot inside a name ends nothing
    assert not lead_contains("It is read.table. Another option is scan.", ["scan"])  # hedged after a wrong claim
    assert not lead_contains("Possibly read.csv\nor scan", ["scan"])
    assert first_sentence("Written by Brian Ripley. He also wrote") == "Written by Brian Ripley."


# ---------------------------------------------------------------------------------------- method rows


def test_method_runs_put_lc_first_and_expand_the_rapid_sweep() -> None:
    runs = method_runs(["rag", "sd", "rapid", "lc"], DecodingSettings(gamma=5), eta_sweep=[0, 5.0, 2.5],
                       gamma_sweep=[3, 8])
    labels = [r.label for r in runs]
    assert labels[:3] == ["lc", "rag", "sd"]  # LC first wherever it is listed, the rest in the given order
    assert labels[3:] == ["rapid(eta=0,gamma=3)", "rapid(eta=0,gamma=8)", "rapid(eta=5,gamma=3)",
                          "rapid(eta=5,gamma=8)", "rapid(eta=2.5,gamma=3)", "rapid(eta=2.5,gamma=8)"]
    assert runs[4].decoding.method == "rapid" and runs[4].decoding.eta == 0 and runs[4].decoding.gamma == 8
    assert runs[2].decoding.gamma == 5  # sweeps vary rapid only
    assert [r.label for r in method_runs(["lc", "rapid"], DecodingSettings(eta=10))] == [
        "lc", "rapid(eta=10,gamma=5)"]


def test_method_runs_reject_unknown_methods_and_orphan_sweeps() -> None:
    with pytest.raises(CliError, match="unknown method"):
        method_runs(["lc", "fastest"], DecodingSettings())
    with pytest.raises(CliError, match="add rapid"):
        method_runs(["lc", "sd"], DecodingSettings(), eta_sweep=[5])


def test_method_runs_take_each_rows_own_eta_gamma_budget_and_style() -> None:
    runs = method_runs(["lc", "rag:budget=1024", "rapid-self:eta=2:style=lead", "lc:style=lead", "sd:gamma=3",
                        "rapid"], DecodingSettings(gamma=5), eta_sweep=[0, 2])
    assert [r.label for r in runs] == ["lc", "rag(budget=1024)", "rapid-self(eta=2,gamma=5,style=lead)",
                                       "lc(style=lead)", "sd(gamma=3)", "rapid(eta=0,gamma=5)", "rapid(eta=2,gamma=5)"]
    assert (runs[1].budget, runs[1].style) == (1024, None) and (runs[2].budget, runs[2].style) == (None, "lead")
    assert runs[2].decoding.eta == 2 and runs[3].decoding.method == "lc" and runs[4].decoding.gamma == 3
    assert runs[0].style is None and runs[0].budget is None  # plain LC stays the baseline
    # Two rows of one method differing only in gamma keep apart labels (they are summarised by label).
    assert [r.label for r in method_runs(["lc", "sd:gamma=3", "sd:gamma=6"], DecodingSettings())][1:] == [
        "sd(gamma=3)", "sd(gamma=6)"]
    for bad, message in (("rag:eta=2", "eta does not apply"), ("rapid:style=terse", "answer style"),
                         ("rapid:size=3", "options are"), ("rag:budget=0", "at least 1"),
                         ("rapid:eta=x", "rapid:")):
        with pytest.raises(CliError, match=message):
            method_runs(["lc", bad], DecodingSettings())


def _row(method: str, position: str, contains: bool, tok_s: float | None, speedup: float | None,
         accepted: int = 0, drafted: int = 0, generated: int = 10, passes: int = 10) -> dict:
    return {"method": method, "position": position, "exact_match": False, "f1": 0.5, "contains": contains,
            "answer": "It is scan." if contains else "Not known.", "answers": ["scan"],
            "decode_tokens_per_s": tok_s, "speedup_vs_lc": speedup, "prefill_s": 1.0, "decode_s": 2.0,
            "generated": generated, "stats": {"accepted": accepted, "drafted": drafted, "target_passes": passes,
                                              # one pass carries the closing stop token too
                                              "accepted_lengths": [generated + 1] if passes else []}}


def test_summarize_takes_the_median_speedup_and_pools_acceptance() -> None:
    rows = [
        _row("lc", "beginning", True, 4.0, 1.0), _row("lc", "end", False, 5.0, 1.0),
        _row("lc", "middle", True, 6.0, 1.0),
        _row("rapid", "beginning", True, 8.0, 2.0, accepted=9, drafted=10, generated=20, passes=5),
        _row("rapid", "end", True, 5.0, 1.0, accepted=1, drafted=10, generated=4, passes=3),
        _row("rapid", "middle", False, 30.0, 5.0, accepted=0, drafted=0, generated=0, passes=0),
    ]
    lc, rapid = summarize(rows, ["lc", "rapid"])
    assert lc["median_speedup_vs_lc"] == 1.0 and lc["acceptance_rate"] is None
    assert lc["contains"] == pytest.approx(2 / 3) and lc["lead"] == pytest.approx(2 / 3)
    assert lc["contains_by_position"] == {"beginning": 1.0, "middle": 1.0, "end": 0.0}
    assert rapid["median_speedup_vs_lc"] == 2.0  # a single outlier does not move the median
    assert rapid["acceptance_rate"] == pytest.approx(10 / 20)
    assert rapid["mean_accepted_length"] == pytest.approx((21 + 5) / 8)  # stop tokens count, as in Stats
    table = format_table({
        "machine": {"processor": "Test CPU", "cores": 2, "torch_threads": 2, "device": "cpu", "dtype": "bfloat16"},
        "models": {"target": "t", "drafter": "d"}, "documents": ["doc.pdf"],
        "context": {"long_tokens": 1000, "draft_tokens": 500}, "n_questions": 3,
        "decoding": {"max_new_tokens": 16}, "summary": [lc, rapid],
    })
    assert "Test CPU, 2 cores" in table and "rapid" in table and "2.00x" in table and "50.0%" in table


def test_load_questions_reports_bad_lines(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "question": "Q?", "answers": ["x"]}\n{"question": "no answers"}\n')
    with pytest.raises(CliError, match="line 2"):
        load_questions(bad)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--questions", "missing.jsonl", "--docs", str(SAMPLE_PDF)], "cannot read the questions file"),
        (["--questions", str(QA), "--docs", str(SAMPLE_PDF), "--methods", "lc,fastest"], "unknown method"),
        (["--questions", str(QA), "--docs", str(SAMPLE_PDF), "--methods", "lc,sd", "--eta-sweep", "5"], "add rapid"),
        (["--questions", str(QA)], "no documents"),
    ],
)
def test_ask_eval_errors_are_one_clear_line(tmp_path: Path, args: list[str], message: str) -> None:
    # cwd is tmp_path (relative paths resolve there): PYTHONPATH makes the subprocess run this checkout's code.
    env = os.environ | {"RAPIDQA_HOME": str(tmp_path), "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "cli.main", "eval", *args], capture_output=True, text=True,
                          env=env, timeout=120, cwd=tmp_path)
    assert done.returncode == 1
    assert message in done.stderr and "Traceback" not in done.stderr


# -------------------------------------------------------------------------------------------- QA set


def _pdf_pages() -> list[str]:
    return [page.extract_text() or "" for page in pypdf.PdfReader(SAMPLE_PDF).pages]


def test_qa_set_answers_are_verbatim_on_their_pages_and_spread_over_the_document() -> None:
    items = load_questions(QA)
    assert len(items) >= 30
    assert len({item.id for item in items}) == len(items), "ids must be unique"
    pages = _pdf_pages()
    # Positions are thirds of the document text (pages joined as the reader joins them, one
    # separator each): the answer's first occurrence on its page decides the third.
    starts, total = [], 0
    for text in pages:
        starts.append(total)
        total += len(text) + 1
    for item in items:
        assert item.question.strip().endswith("?"), item.id
        assert 1 <= item.page <= len(pages), item.id
        page_text = pages[item.page - 1]
        for answer in item.answers:
            assert answer in page_text, f"{item.id}: {answer!r} is not on page {item.page}"
            assert len(answer.split()) <= 4, f"{item.id}: {answer!r} is not a short span"
        assert not contains_answer(item.question, item.answers), f"{item.id}: the question gives the answer away"
        fraction = (starts[item.page - 1] + page_text.index(item.answers[0])) / total
        third = "beginning" if fraction < 1 / 3 else "middle" if fraction < 2 / 3 else "end"
        assert item.position == third, f"{item.id}: at {fraction:.2f} of the document, not {item.position}"
    counts = Counter(item.position for item in items)
    assert all(counts[position] >= 8 for position in ("beginning", "middle", "end")), counts


# -------------------------------------------------------------------------------------------- end to end


@pytest.mark.real_models
@pytest.mark.timeout(600)
def test_ask_eval_end_to_end_on_two_questions(tmp_path: Path, small_model_dir: Path) -> None:
    first_two = load_questions(QA)[:2]
    pages = list(range(min(q.page for q in first_two), max(q.page for q in first_two) + 1))
    assert len(pages) <= 3, "the first two questions should sit on neighbouring pages (keeps this test short)"
    pdf = pdf_excerpt(pages, tmp_path / "excerpt.pdf")
    questions = tmp_path / "qa.jsonl"
    questions.write_text("".join(json.dumps(vars(q)) + "\n" for q in first_two))
    out = tmp_path / "out"
    # A private home keeps the prefix cache and LC reference of this run out of the user's own.
    env = os.environ | {"RAPIDQA_HOME": str(tmp_path / "home"), "RAPIDQA_MODELS_DIR": str(real_models_dir())}
    done = subprocess.run(
        [sys.executable, "-m", "cli.main", "eval", "--docs", str(pdf), "--questions", str(questions),
         "--methods", "lc,rapid", "--fast", "--max-new-tokens", "16", "--index", str(tmp_path / "index"),
         "--out", str(out)],
        capture_output=True, text=True, env=env, timeout=580, cwd=REPO,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "machine:" in done.stdout and "qwen2.5-coder-0.5b" in done.stdout
    assert "speedup" in done.stdout and "rapid(eta=0,gamma=5)" in done.stdout
    assert (out / "table.txt").read_text().strip() in done.stdout
    assert (out / "quality_vs_speedup.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    results = json.loads((out / "results.json").read_text())
    assert results["complete"] and results["n_questions"] == 2
    assert results["methods"] == ["lc", "rapid(eta=0,gamma=5)"]
    assert len(results["rows"]) == 4
    assert [r["method"] for r in results["rows"][:2]] == ["lc", "rapid(eta=0,gamma=5)"]  # LC first
    summary = {s["method"]: s for s in results["summary"]}
    assert set(summary) == {"lc", "rapid(eta=0,gamma=5)"}
    for s in summary.values():
        for key in ("exact_match", "f1", "contains", "decode_tokens_per_s", "mean_accepted_length", "prefill_s",
                    "median_speedup_vs_lc"):
            assert s[key] is not None, (s["method"], key)
        assert 0.0 <= s["contains"] <= 1.0 and 0.0 <= s["f1"] <= 1.0
    assert summary["lc"]["median_speedup_vs_lc"] == 1.0
    assert summary["rapid(eta=0,gamma=5)"]["acceptance_rate"] is not None
    assert summary["rapid(eta=0,gamma=5)"]["equals_lc"] == [2, 2]  # exact: else the run would have failed
    for row in results["rows"]:
        assert row["answer"].strip() and row["generated"] > 0 and row["context_tokens"] > 0
    assert summary["lc"]["mean_accepted_length"] == 1.0  # LC: one token per target pass, stop token included

    (out / "table.txt").unlink()
    again = subprocess.run([sys.executable, "-m", "cli.main", "eval", "--report", str(out / "results.json")],
                           capture_output=True, text=True, env=env, timeout=120, cwd=REPO)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (out / "table.txt").read_text().strip() in again.stdout
    assert json.loads((out / "results.json").read_text())["summary"] == results["summary"]


# ---------------------------------------------------------------------------- exactness (tiny models)


def _tiny_eval(tmp_path: Path, methods: list[str]) -> dict:
    from tests.test_windows_engine import QUESTIONS, TOPICS, make_engine

    engine = make_engine(tmp_path / "home")
    index = engine.open_index(tmp_path / "index")
    for name in ("alpaca.txt", "orchid.txt"):
        index.add_file(write(tmp_path / name, " ".join([TOPICS[name]] * 2)))
    items = [QAItem(f"q{i}", QUESTIONS[name], ["yarn"]) for i, name in enumerate(("alpaca.txt", "orchid.txt"), 1)]
    runs = method_runs(methods, engine.settings.decoding)
    out = tmp_path / "out"
    out.mkdir()
    try:
        return run_eval(engine, index, items, runs, engine.settings, warmup=False, out=out, log=lambda _: None,
                        documents=["alpaca.txt", "orchid.txt"], argv=[])
    finally:
        index.close()


@pytest.mark.timeout(600)
def test_eval_checks_every_eta0_speculative_answer_against_lc(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    results = _tiny_eval(tmp_path, ["lc", "rag", "sd", "rapid"])
    by_method = {s["method"]: s for s in results["summary"]}
    assert by_method["lc"]["equals_lc"] is None and by_method["rag"]["equals_lc"] is None  # nothing to check
    assert by_method["sd"]["equals_lc"] == [2, 2]
    assert by_method["rapid(eta=0,gamma=4)"]["equals_lc"] == [2, 2]
    rapid_rows = [r for r in results["rows"] if r["base_method"] == "rapid"]
    assert [r["equals_lc"] for r in rapid_rows] == [True, True]
    assert write_report(results, tmp_path / "out") == 0
    table = capsys.readouterr().out
    assert "= LC" in table and "2/2" in table
    # The engine that ran, for the run and for every row.
    assert set(results["engine"]) == {"engine", "linear_kernel", "attention_kernel", "kv_cache", "threads", "warning"}
    assert all(row["stats"]["engine"] == results["engine"] for row in results["rows"])
    assert f"engine: {results['engine']['engine']}" in table


@pytest.mark.timeout(600)
def test_eval_fails_naming_the_questions_whose_answer_differs_from_lc(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    real = runner.answer_once

    def one_wrong(engine, question, index, decoding, **options):  # type: ignore[no-untyped-def]
        done = real(engine, question, index, decoding, **options)
        if decoding.method == "rapid" and question.startswith("What do bees"):  # q2's rapid answer: a bug
            done.token_ids[-1] ^= 1
        return done

    monkeypatch.setattr(runner, "answer_once", one_wrong)
    results = _tiny_eval(tmp_path, ["lc", "rapid"])
    rows = {(r["id"], r["base_method"]): r for r in results["rows"]}
    assert rows["q1", "rapid"]["equals_lc"] is True and rows["q2", "rapid"]["equals_lc"] is False
    assert rows["q2", "rapid"]["differs_from_lc_at"] == rows["q2", "rapid"]["generated"] - 1  # the last token
    assert results["summary"][1]["equals_lc"] == [1, 2]
    assert write_report(results, tmp_path / "out") == 1
    captured = capsys.readouterr()
    assert "1/2" in captured.out
    assert "q2 rapid(eta=0,gamma=4)" in captured.err and "q1" not in captured.err


@pytest.mark.timeout(600)
def test_eval_rows_ask_in_their_own_style_and_equal_lc_in_that_style(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A styled row's prompt carries the instruction after the question; its eta = 0 answer must equal
    LC's in the same style, and the budget reaches retrieval exactly."""
    asked, prefixes = [], []
    real = runner.answer_once

    def recording(engine, question, index, decoding, **options):  # type: ignore[no-untyped-def]
        done = real(engine, question, index, decoding, **options)
        contexts, long_prompt, _, _ = engine.conversation_prompts(
            question, index, decoding, options["retrieval"], style=options["style"])
        asked.append((options["style"], engine.target.decode(long_prompt.suffix), contexts.rag_tokens))
        prefixes.append(tuple(long_prompt.prefix))
        return done

    monkeypatch.setattr(runner, "answer_once", recording)
    results = _tiny_eval(tmp_path, ["lc", "lc:style=lead", "rapid:style=lead", "rag:budget=70"])
    by_method = {s["method"]: s for s in results["summary"]}
    assert by_method["rapid(eta=0,gamma=4,style=lead)"]["equals_lc"] == [2, 2]
    instruction = "one sentence of support"
    assert [instruction in suffix for style, suffix, _ in asked if style != "lead"] == [False] * 4
    assert [instruction in suffix for style, suffix, _ in asked if style == "lead"] == [True] * 4
    assert len(set(prefixes[:4])) == 1 and len(set(prefixes[4:])) == 1  # the documents' cached KV serves every style
    default_budget, small_budget = [tokens for _, _, tokens in asked[0::4]], [tokens for _, _, tokens in asked[3::4]]
    assert all(small < default for small, default in zip(small_budget, default_budget, strict=True))


@pytest.mark.timeout(600)
def test_report_beside_joins_another_runs_rows_paired_against_this_runs_lc(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from app.eval.reporting import report, write_json

    first, second = _tiny_eval(tmp_path / "a", ["lc", "rag"]), _tiny_eval(tmp_path / "b", ["lc", "rapid"])
    second["models"] = dict(second["models"], target="other-target")
    write_json(first, tmp_path / "a.json")
    write_json(second, tmp_path / "b.json")
    assert report(tmp_path / "a.json", [tmp_path / "b.json"], tmp_path / "merged") == 0
    merged = json.loads((tmp_path / "merged" / "results.json").read_text())
    assert merged["methods"] == ["lc", "rag", "other-target lc", "other-target rapid(eta=0,gamma=4)"]
    paired = {r["method"]: r for r in merged["intervals"]}
    assert paired["other-target rapid(eta=0,gamma=4)"]["vs_lc"]["n"] == 2 and paired["other-target lc"]["vs_lc"]
    assert "beside: other-target" in capsys.readouterr().out
    second["questions"] = second["questions"][:1]
    write_json(second, tmp_path / "b.json")
    with pytest.raises(CliError, match="other questions"):
        report(tmp_path / "a.json", [tmp_path / "b.json"], tmp_path / "merged")


def test_the_answer_style_is_an_option_with_named_choices() -> None:
    import argparse

    from app.options import add_decoding_options, settings_from_args

    parser = argparse.ArgumentParser()
    add_decoding_options(parser)
    assert settings_from_args(parser.parse_args([])).answer_style == "brief"
    assert settings_from_args(parser.parse_args(["--answer-style", "lead"])).answer_style == "lead"
    with pytest.raises(SystemExit):
        parser.parse_args(["--answer-style", "terse"])
