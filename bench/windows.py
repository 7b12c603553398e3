"""Windows and routing on a corpus larger than the target's window, without running the model.

    python -m bench.windows [--docs data/R-data.pdf data/R-intro.pdf data/R-admin.pdf]
                            [--questions data/qa_big.jsonl] [--out bench/results/windows.json]

Ingests the documents into a fresh index (the production reader, chunker and embedder), prints the
windows the engine would prefill (tokens and what each holds), then routes every labelled question
and reports how often retrieval found its labelled page and how often the routed window holds that
page. The target model is loaded for its tokenizer and window size only; nothing is prefilled.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from app.config import Settings
from app.machine import cpu_name
from app.pipeline import Engine

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "data" / name for name in ("R-data.pdf", "R-intro.pdf", "R-admin.pdf")]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=Path, nargs="+", default=DOCS)
    parser.add_argument("--questions", type=Path, default=REPO / "data" / "qa_big.jsonl")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "windows.json")
    args = parser.parse_args(argv)

    items = [json.loads(line) for line in args.questions.read_text().splitlines() if line.strip()]
    with tempfile.TemporaryDirectory(prefix="rapidqa-windows-") as tmp:
        engine = Engine(Settings(home=Path(tmp)), log=lambda _: None)
        index = engine.open_index(Path(tmp) / "index")
        started = time.perf_counter()
        index.add_files(args.docs, progress=False)
        ingest_s = time.perf_counter() - started
        started = time.perf_counter()
        windows = engine.windows(index)
        plan_s = time.perf_counter() - started
        print(f"machine: {cpu_name()}, {os.cpu_count()} cores; target {engine.settings.models.target} reads "
              f"{engine.target.max_positions} positions, {engine.window_capacity()} of them documents")
        print(f"ingest {ingest_s:.1f} s; {len(windows)} windows planned in {plan_s:.2f} s")
        for window in windows:
            print(f"  window {window.number}: {window.tokens:6d} tokens  {window.label()}")
        rows = []
        for item in items:
            started = time.perf_counter()
            contexts, _, _ = engine.prompts(item["question"], index, engine.settings.decoding)
            route_s = time.perf_counter() - started
            reading = contexts.reading
            read = windows[reading.window - 1] if reading else windows[0]
            holding = [w.number for w in windows for part in w.parts if part.source == item["source"]
                       and any(c.page == item["page"] and part.holds(c)
                               for c in index.chunks(part.doc_id))]
            cited = [c for c in contexts.citations if c.source == item["source"] and c.page == item["page"]]
            rows.append({
                "id": item["id"], "source": item["source"], "page": item["page"],
                "window_read": read.number, "windows_holding_page": holding,
                "page_in_window_read": read.number in holding,
                "page_retrieved": bool(cited), "page_retrieved_in_window_read": any(c.read for c in cited),
                "retrieved_elsewhere": reading.elsewhere if reading else 0,
                "retrieval_and_routing_s": route_s,
            })
            print(f"  {item['id']:10s} p.{item['page']:3d} -> window {read.number}"
                  f" (page in {holding}) retrieved={'yes' if cited else 'no'}"
                  f" elsewhere={rows[-1]['retrieved_elsewhere']}")
        index.close()
    n = len(rows)
    summary = {
        "questions": n,
        "page_in_window_read": sum(r["page_in_window_read"] for r in rows) / n,
        "page_retrieved": sum(r["page_retrieved"] for r in rows) / n,
        "answers_with_evidence_elsewhere": sum(r["retrieved_elsewhere"] > 0 for r in rows) / n,
    }
    print(json.dumps(summary, indent=2))
    result = {"command": ["python", "-m", "bench.windows", *(argv or [])], "machine": cpu_name(),
              "ingest_s": ingest_s, "plan_s": plan_s,
              "windows": [{"number": w.number, "tokens": w.tokens, "label": w.label()} for w in windows],
              "summary": summary, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
