"""`ask`: answer questions about documents from the command line; other commands are dispatched to their module.

This module only parses and dispatches: shared options live in app.options, the answer's
JSON and text layout in app.report.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from app.errors import user_message
from app.options import add_question_options, engine_and_index, quiet_environment
from app.terminal import show_answer

SUBCOMMANDS = {
    "serve": "start the web UI (Gradio) and the OpenAI-compatible API on localhost",
    "chat": "a conversation in the terminal: follow-up questions keep the earlier ones in mind",
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
    add_question_options(parser)
    return parser


def run_question(argv: Sequence[str]) -> int:
    args = question_parser().parse_args(argv)
    settings, engine, index = engine_and_index(args)
    show_answer(engine.answer(args.question, index, settings.decoding, compare=args.compare), args.json)
    return 0


def run_subcommand(name: str, argv: Sequence[str]) -> int:
    # Each command imports only what it needs: `ask docs` should not pay for Gradio, nor `ask --help` for torch.
    if name == "serve":
        from ui.serve import main as serve_main

        return serve_main(argv)
    if name == "chat":
        from app.chat import main as chat_main

        return chat_main(argv)
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
