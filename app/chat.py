"""`ask chat`: a conversation about documents in the terminal; each answer sees the earlier exchanges.

A line holding only /new starts a new conversation; an empty line, /quit or end of input (Ctrl-D) ends.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from app.conversation import Turn
from app.options import add_question_options, engine_and_index, log
from app.terminal import show_answer

PROMPT = "you> "


def chat_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ask chat",
        description="Ask questions about documents as a conversation: a follow-up such as 'and for DBF files?' "
        "is read with the earlier exchanges (rewritten into a standalone question for retrieval). "
        "Type /new for a new conversation; an empty line, /quit or Ctrl-D ends.",
    )
    add_question_options(parser)
    return parser


def main(argv: Sequence[str], read: Callable[[str], str] = input) -> int:
    args = chat_parser().parse_args(list(argv))
    settings, engine, index = engine_and_index(args)
    history: list[Turn] = []
    while True:
        try:
            question = read(PROMPT).strip()
        except EOFError:
            break
        if question in ("", "/quit", "/exit"):
            break
        if question == "/new":
            history.clear()
            log("[new conversation]")
            continue
        events = engine.answer(question, index, settings.decoding, compare=args.compare, history=tuple(history))
        done = show_answer(events, args.json)
        history.append(Turn(question, done.answer))
        print(flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
