"""Time to first token through the OpenAI-compatible API against the UI's /ask API, on one running
`ask serve`: the same questions, interleaved.

    ask serve --index DIR --port 7861 &   # then
    python -m bench.api_ttft --port 7861 [--questions data/qa.jsonl] [--n 6] [--max-tokens 24]

API: seconds from the request to the first streamed content, seen by the client, and the server's
own question_to_first_s from the final chunk's `rapidqa.stats`. UI: /ask returns the whole answer,
so its server-recorded question_to_first_s is the comparable figure. Medians are printed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

KEYS = ("api_client_first_s", "api_server_first_s", "ui_server_first_s")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.api_ttft", description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--questions", type=Path, default=Path("data/qa.jsonl"))
    parser.add_argument("--n", type=int, default=6, help="how many questions (from the top of the file)")
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--method", default="rapid", help="the UI /ask method (the API uses the server's own)")
    args = parser.parse_args(argv)
    # Clients of a running server: test dependencies, imported only when the bench runs.
    from gradio_client import Client
    from openai import OpenAI

    questions = [json.loads(line)["question"] for line in args.questions.read_text().splitlines() if line.strip()]
    api = OpenAI(base_url=f"http://127.0.0.1:{args.port}/v1", api_key="unused")
    ui = Client(f"http://127.0.0.1:{args.port}/", verbose=False)
    rows = []
    for question in questions[: args.n]:
        start, first, server = time.perf_counter(), None, None
        for chunk in api.chat.completions.create(model="rapidqa", stream=True, max_tokens=args.max_tokens,
                                                 messages=[{"role": "user", "content": question}]):
            if first is None and chunk.choices and chunk.choices[0].delta.content:
                first = time.perf_counter() - start
            server = (chunk.to_dict().get("rapidqa") or {}).get("stats", {}).get("question_to_first_s", server)
        _, stats, _ = ui.predict(question, args.method, args.max_tokens, api_name="/ask")
        rows.append(dict(zip(KEYS, (first, server, stats.get("question_to_first_s")), strict=True)))
        print(json.dumps({"question": question[:48], **rows[-1]}), flush=True)
    print(json.dumps({key: statistics.median(r[key] for r in rows if r[key] is not None) for key in KEYS}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
