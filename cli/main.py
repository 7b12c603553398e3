"""`ask`: answer questions about documents from the command line; other commands are dispatched to their module.

This module only parses and dispatches: shared options live in app.options, the answer's
JSON and text layout in app.report.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from app.errors import user_message
from app.events import Done, Preparing, Sources, Status, Token
from app.options import (
    add_decoding_options,
    add_model_options,
    check_document_args,
    index_dir_for,
    ingest_documents,
    log,
    quiet_environment,
    settings_from_args,
)
from app.report import done_record, summary_text

SUBCOMMANDS = {
    "serve": "start the web UI (Gradio) on localhost",
    "ingest": "add documents to an index",
    "docs": "list the documents of an index",
    "delete": "remove a document from an index",
    "models": "fetch and convert the embedded models",
    "bench": "decoding benchmark: every method on the same input (python -m bench.decode)",
    "eval": "quality and speed of every method on a QA set",
}

EPILOG = "other commands:\n" + "\n".join(f"  ask {name:7s} {text}" for name, text in SUBCOMMANDS.items()) + (
    "\n\nrun `ask COMMAND --help` for a command's options.\n"
    "environment: RAPIDQA_HOME (models, indexes, caches; default ~/.cache/rapidqa)"
)


def question_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ask",
        description="Answer a question about documents with RAPID speculative decoding: a small RAG "
        "drafter reads retrieved passages, the long-context target reads everything and verifies.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("question", help="the question to answer")
    parser.add_argument("--docs", nargs="+", type=Path, metavar="PATH",
                        help="documents or folders to ingest first (PDF, TXT, MD, HTML, DOCX)")
    parser.add_argument("--index", type=Path, metavar="DIR",
                        help="persistent index directory (default: one kept per --docs set)")
    parser.add_argument("--compare", action="store_true",
                        help="also run LC on the same input and report the measured speedup")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    add_model_options(parser)
    add_decoding_options(parser)
    return parser


def run_question(argv: Sequence[str]) -> int:
    args = question_parser().parse_args(argv)
    settings = settings_from_args(args)
    check_document_args(args)
    index_dir = index_dir_for(args, settings)
    settings.decoding.validate()

    from app.pipeline import Engine  # torch takes seconds to import: not before the arguments are known good
    from app.progress import PreparingBars

    engine = Engine(settings, log=log)
    index = engine.open_index(index_dir)
    if args.docs:
        ingest_documents(index, args.docs, progress=True, engine=engine)
    done = None
    bars = PreparingBars()
    for event in engine.answer(args.question, index, settings.decoding, compare=args.compare):
        if isinstance(event, Preparing):
            bars.show(event)
            continue
        bars.close()
        if isinstance(event, Status):
            log(f"[{event.message}]")
        elif isinstance(event, Sources) and not args.json:
            log(f"[retrieved {len(event.citations)} passages for the drafter]")
            if event.reading is not None:
                log(f"[the target will {event.reading.note()}]")
        elif isinstance(event, Token) and not args.json:
            print(event.text, end="", flush=True)
        elif isinstance(event, Done):
            done = event
    assert done is not None
    print(json.dumps(done_record(done), indent=2) if args.json else summary_text(done))
    return 0


def run_subcommand(name: str, argv: Sequence[str]) -> int:
    # Each command imports only what it needs: `ask docs` should not pay for Gradio, nor `ask --help` for torch.
    if name == "serve":
        from ui.serve import main as serve_main

        return serve_main(argv)
    if name == "bench":
        from bench.decode import main as bench_main

        return bench_main(argv)
    if name == "eval":
        from app.eval.runner import main as eval_main

        return eval_main(argv)
    from app.admin import main as admin_main

    return admin_main(name, argv)


def main(argv: Sequence[str] | None = None) -> int:
    quiet_environment()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] in SUBCOMMANDS:
            return run_subcommand(argv[0], argv[1:])
        return run_question(argv)
    except KeyboardInterrupt:
        print("ask: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # every failure ends as one clear line, never a traceback
        message = user_message(error)
        if message is None:
            raise
        print(f"ask: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
