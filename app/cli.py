"""`ask`: answer questions about documents from the command line (thin over app.pipeline)."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from app.errors import CliError, user_message

if TYPE_CHECKING:
    from app.config import Settings
    from app.events import Done
    from app.pipeline import Engine
    from retrieval.index import HybridIndex

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


def _quiet_environment() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("ANONYMIZED_TELEMETRY", "False")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def add_model_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("models")
    group.add_argument("--target", help="target model: embedded name, HF model directory or .gguf path "
                       "(default qwen2.5-coder-1.5b)")
    group.add_argument("--drafter", help="RAG drafter model, same tokenizer as the target (default qwen2.5-coder-0.5b)")
    group.add_argument("--dtype", choices=["auto", "bf16", "fp32", "fp16"], help="weights dtype (default auto)")
    group.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when present)")
    group.add_argument("--fast", action="store_true",
                       help="quick setting: Qwen2.5-Coder-0.5B as both target and drafter (self-speculation)")


def add_decoding_options(parser: argparse.ArgumentParser) -> None:
    from decoding.methods import METHODS

    group = parser.add_argument_group("decoding")
    group.add_argument("--method", choices=list(METHODS), help="decoding method (default rapid)")
    group.add_argument("--max-new-tokens", type=int, help="answer length limit in tokens (default 128)")
    group.add_argument("--temperature", type=float, help="0 = greedy (default); > 0 samples")
    group.add_argument("--top-p", type=float, help="nucleus sampling threshold (default 1.0)")
    group.add_argument("--seed", type=int, help="random seed for sampling (default 0)")
    group.add_argument("--gamma", type=int, help="drafted tokens per target pass (default 5)")
    group.add_argument("--eta", type=float, help="RAPID retrieval-augmented target strength (default 0 = exact)")
    group.add_argument("--lookup", action="store_true",
                       help="RAPID: try free n-gram lookup drafts from the retrieved context first")


def settings_from_args(args: argparse.Namespace) -> Settings:
    from app.config import Settings

    settings = Settings()
    models = settings.models
    if getattr(args, "fast", False):
        models = replace(models, target="qwen2.5-coder-0.5b", drafter="qwen2.5-coder-0.5b")
    for field in ("target", "drafter", "dtype", "device"):
        if getattr(args, field, None):
            models = replace(models, **{field: getattr(args, field)})
    decoding = settings.decoding
    for field in ("method", "max_new_tokens", "temperature", "top_p", "seed", "gamma", "eta"):
        value = getattr(args, field, None)
        if value is not None:
            decoding = replace(decoding, **{field: value})
    if getattr(args, "lookup", False):
        decoding = replace(decoding, lookup_in_rapid=True)
    return replace(settings, models=models, decoding=decoding)


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


def log(message: str) -> None:
    """Progress and status go to stderr, so stdout carries only the answer (or the JSON)."""
    print(message, file=sys.stderr, flush=True)


def check_document_args(args: argparse.Namespace) -> None:
    """--docs must exist, and --index alone must name an existing index."""
    for path in args.docs or []:
        if not path.exists():
            raise CliError(f"no such file or folder: {path}")
    if args.index and not args.docs and not (args.index / "docstore.sqlite").exists():
        raise CliError(f"{args.index} is not an index (no docstore.sqlite); create it with --docs or `ask ingest`")


def ingest_documents(index: HybridIndex, paths: Sequence[Path], progress: bool, engine: Engine | None = None) -> None:
    """Add files and folders; a bad file is reported and skipped, but nothing indexable is an error."""
    results = engine.ingest(index, paths, progress) if engine else index.add_files(paths, progress=progress)
    for result in results:
        if not result.ok:
            log(f"skipped {result.source}: {result.message}")
    if not any(r.ok for r in results):
        raise CliError("none of the documents could be indexed")


def index_dir_for(args: argparse.Namespace, settings: Settings) -> Path:
    if args.index:
        return args.index
    if args.docs:
        key = hashlib.sha256("\n".join(sorted(str(p.resolve()) for p in args.docs)).encode()).hexdigest()[:16]
        return settings.home / "indexes" / key
    raise CliError("no documents: pass --docs FILE... to ingest, or --index DIR for an existing index")


def run_question(argv: Sequence[str]) -> int:
    args = question_parser().parse_args(argv)
    settings = settings_from_args(args)
    check_document_args(args)
    index_dir = index_dir_for(args, settings)
    settings.decoding.validate()

    from app.events import Done, Preparing, Progress, Sources, Status, Token
    from app.pipeline import Engine
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
        elif isinstance(event, Token) and not args.json:
            print(event.text, end="", flush=True)
        elif isinstance(event, Done):
            done = event
        elif isinstance(event, Progress):
            pass
    assert done is not None
    if args.json:
        print(json.dumps(done_to_json(done), indent=2))
    else:
        print_summary(done)
    return 0


def done_to_json(done: Done) -> dict[str, object]:
    return {
        "answer": done.answer,
        "sources": [
            {"document": c.source, "page": c.page, "section": c.section, "excerpt": c.excerpt, "score": c.score}
            for c in done.citations
        ],
        "stats": done.stats.to_dict() | {"token_times": None, "accepted_lengths": done.stats.accepted_lengths},
        "speedup_vs_lc": done.speedup.value,
        "speedup_basis": done.speedup.label,
        "lc_stats": done.lc_stats.to_dict() if done.lc_stats else None,
    }


def format_stats(done: Done) -> list[str]:
    s = done.stats
    rate = f"{s.acceptance_rate:.1%}" if s.acceptance_rate is not None else "n/a"
    mal = f"{s.mean_accepted_length:.2f}" if s.mean_accepted_length is not None else "n/a"
    tps = f"{s.decode_tokens_per_s:.2f}" if s.decode_tokens_per_s else "n/a"
    speed = f"{done.speedup.value:.2f}x" if done.speedup.value is not None else "n/a"
    cached = f" ({s.prefix_cached_tokens} from the prefix cache)" if s.prefix_cached_tokens else ""
    return [
        f"method {s.method}: {s.generated} tokens generated, {s.drafted} drafted, {s.accepted} accepted",
        f"acceptance rate {rate}, mean accepted length per target pass {mal}",
        f"context {s.context_tokens} tokens{cached}, drafter context {s.draft_context_tokens} tokens",
        f"answer in {s.answer_s:.2f} s end to end",
        f"first token after {s.first_token_s:.2f} s, prefill {s.prefill_s:.2f} s, decode {s.decode_s:.2f} s, "
        f"{tps} tokens/s",
        f"speedup over LC decoding: {speed} ({done.speedup.label})",
    ]


def print_summary(done: Done) -> None:
    print("\n\nSources:")
    for i, c in enumerate(done.citations, 1):
        print(f"  [{i}] {c.label()}: {c.excerpt[:200]}")
    print("\nStatistics:")
    for line in format_stats(done):
        print(f"  {line}")


def run_subcommand(name: str, argv: Sequence[str]) -> int:
    if name == "serve":
        from ui.web import main as serve_main

        return serve_main(argv)
    if name == "bench":
        from bench.decode import main as bench_main

        return bench_main(argv)
    if name == "eval":
        from app.evaluate import main as eval_main

        return eval_main(argv)
    from app.admin import main as admin_main

    return admin_main(name, argv)


def main(argv: Sequence[str] | None = None) -> int:
    _quiet_environment()
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
