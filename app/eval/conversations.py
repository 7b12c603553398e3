"""`ask eval --conversations FILE`: follow-up questions, each read three ways.

- standalone: the question as written to stand alone (the data's `standalone`), asked alone;
- rewritten: the follow-up in its conversation, as the product answers it (the drafter's rewrite
  drives retrieval, the history is in the prompts);
- raw: the follow-up as written, with no rewrite (retrieval) and no history (answer).

Retrieval recall@k: a chunk of the labelled page among the top k hits of each query. Answers:
`contains` (an accepted answer string in the answer) of each way of asking. Answers use the fast
mode (exact: the target reads every document, so retrieval changes its speed, not its tokens).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from app.conversation import Turn
from app.errors import CliError
from app.eval.reporting import figure, write_json
from app.eval.scoring import contains_answer
from app.machine import machine_info
from app.pipeline import Engine, answer_once
from app.presets import FAST
from retrieval.index import HybridIndex

WAYS = ("standalone", "rewritten", "raw")
RECALL_K = 5


@dataclass(frozen=True)
class ConversationItem:
    id: str
    history: tuple[Turn, ...]
    question: str  # the follow-up, meaningless alone
    standalone: str  # the same question written to stand alone
    answers: list[str]
    page: int
    source: str | None = None


def load_conversations(path: Path) -> list[ConversationItem]:
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as error:
        raise CliError(f"cannot read the conversations file {path}: {error.strerror or error}") from None
    items = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
            history = tuple(Turn(str(t["question"]), str(t["answer"])) for t in data["history"])
            item = ConversationItem(str(data["id"]), history, str(data["question"]), str(data["standalone"]),
                                    [str(a) for a in data["answers"]], int(data["page"]), data.get("source"))
        except (ValueError, KeyError, TypeError) as error:
            raise CliError(f"{path}, line {number}: not a conversation record ({error})") from None
        if not item.history or not item.answers:
            raise CliError(f"{path}, line {number}: needs a history and at least one answer")
        items.append(item)
    if not items:
        raise CliError(f"{path} holds no conversations")
    return items


def page_found(index: HybridIndex, query: str, item: ConversationItem, k: int = RECALL_K) -> bool:
    return any(hit.chunk.page == item.page and item.source in (None, hit.chunk.source)
               for hit in index.search(query, k=k))


def run_conversations(engine: Engine, index: HybridIndex, items: list[ConversationItem], max_new_tokens: int,
                      out: Path, log: Callable[[str], None], answers: bool = True) -> dict:
    """Recall for every item first (cheap), then the answers; results.json is written after each step."""
    decoding = replace(FAST.apply(engine.settings.decoding), temperature=0.0, max_new_tokens=max_new_tokens)
    results: dict = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine_info(str(engine.device), str(engine.target.model.dtype).removeprefix("torch.")),
        "models": {"target": engine.settings.models.target, "drafter": engine.settings.models.drafter},
        "decoding": asdict(decoding), "k": RECALL_K, "rows": [], "summary": {}, "complete": False,
    }
    rows: list[dict] = results["rows"]
    for number, item in enumerate(items, 1):
        started = time.perf_counter()
        rewritten = engine.standalone_question(item.question, item.history)
        row = {"id": item.id, "question": item.question, "standalone": item.standalone, "rewritten": rewritten,
               "rewrite_s": time.perf_counter() - started}
        queries = {"standalone": item.standalone, "rewritten": rewritten, "raw": item.question}
        row["recall"] = {way: page_found(index, query, item) for way, query in queries.items()}
        rows.append(row)
        log(f"[{number}/{len(items)} {item.id}] rewrite {rewritten!r}: recall {row['recall']}")
        results["summary"] = summarize(rows)
        write_json(results, out / "results.json")
    if answers:
        for number, (item, row) in enumerate(zip(items, rows, strict=True), 1):
            asked = {
                "standalone": answer_once(engine, item.standalone, index, decoding),
                "rewritten": answer_once(engine, item.question, index, decoding, history=item.history),
                "raw": answer_once(engine, item.question, index, decoding),
            }
            row["answers"] = {way: done.answer for way, done in asked.items()}
            row["contains"] = {way: contains_answer(done.answer, item.answers) for way, done in asked.items()}
            log(f"[{number}/{len(items)} {item.id}] contains {row['contains']}")
            results["summary"] = summarize(rows)
            write_json(results, out / "results.json")
    results["complete"] = True
    write_json(results, out / "results.json")
    (out / "table.txt").write_text(table(results) + "\n")
    return results


def summarize(rows: list[dict]) -> dict:
    def share(key: str, way: str) -> float | None:
        values = [row[key][way] for row in rows if key in row]
        return sum(values) / len(values) if values else None

    return {key: {way: share(key, way) for way in WAYS} for key in ("recall", "contains")} | {
        "n": len(rows), "answered": sum(1 for row in rows if "contains" in row)}


def table(results: dict) -> str:
    summary = results["summary"]

    def line(name: str, key: str) -> str:
        return f"{name:22s}" + "".join(f"{figure(summary[key][way], '.2f'):>12s}" for way in WAYS)

    lines = [f"{'':22s}" + "".join(f"{way:>12s}" for way in WAYS),
             line(f"recall@{results['k']}", "recall"), line("answer contains", "contains")]
    lines.append(f"({summary['n']} conversations, {summary['answered']} answered; "
                 f"target {results['models']['target']}, rewrites by {results['models']['drafter']})")
    return "\n".join(lines)
