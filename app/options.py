"""Command-line options shared by `ask`, `ask serve`, `ask eval`, the admin commands and the benchmarks.

Each option group is declared once here, and `settings_from_args` is the only place where parsed
options become a Settings object. No heavy imports: `ask --help` must stay instant.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from app.answer_style import STYLES
from app.config import RAG_READ_CHUNK_KV, RAG_READ_JOINT, RAG_READS, Settings
from app.errors import CliError
from app.presets import FAST, PRESETS
from decoding.methods import METHODS

if TYPE_CHECKING:
    from app.pipeline import Engine
    from retrieval.index import HybridIndex

# Nothing downloads at run time and nothing reports usage: set before any library reads them.
QUIET_ENVIRONMENT = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "GRADIO_ANALYTICS_ENABLED": "False",
    "ANONYMIZED_TELEMETRY": "False",
    "TOKENIZERS_PARALLELISM": "false",
}


def quiet_environment() -> None:
    """Defaults only: a variable the user set keeps its value."""
    for name, value in QUIET_ENVIRONMENT.items():
        os.environ.setdefault(name, value)


def add_model_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("models")
    group.add_argument("--target", help="target model: embedded name, HF model directory or .gguf path "
                       "(default qwen2.5-coder-1.5b)")
    group.add_argument("--drafter", help="RAG drafter model, same tokenizer as the target (default qwen2.5-coder-0.5b)")
    group.add_argument("--dtype", choices=["auto", "bf16", "fp32", "fp16"],
                       help="weights (default auto: a GGUF model's own 4/8-bit blocks on a CPU, bf16 on CUDA; "
                       "an explicit dtype keeps dense weights)")
    group.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when present)")
    group.add_argument("--kv-dtype", choices=["auto", "q8", "bf16"],
                       help="what the KV cache stores (default auto: q8 on a CPU, the model's dtype elsewhere); "
                       "q8: 8-bit values with a bf16 scale per 32, half of bf16's bytes; bf16: the unquantized "
                       "cache, in the model's dtype")
    group.add_argument("--fast", action="store_true",
                       help="quick setting: Qwen2.5-Coder-0.5B as both target and drafter (self-speculation)")


def add_decoding_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("decoding")
    modes = "; ".join(f"{p.name}: {p.method} with eta {p.eta:g}" for p in PRESETS.values())
    group.add_argument("--mode", choices=list(PRESETS),
                       help=f"answer mode: {modes} (default {FAST.name}); --method, --eta and --gamma override it")
    group.add_argument("--method", choices=list(METHODS), help="decoding method (default rapid)")
    group.add_argument("--max-new-tokens", type=int, help="answer length limit in tokens (default 128)")
    group.add_argument("--temperature", type=float, help="0 = greedy (default); > 0 samples")
    group.add_argument("--top-p", type=float, help="nucleus sampling threshold (default 1.0)")
    group.add_argument("--seed", type=int, help="random seed for sampling (default 0)")
    group.add_argument("--gamma", type=int, help="drafted tokens per target pass (default 5)")
    group.add_argument("--eta", type=float, help="RAPID retrieval-augmented target strength (default 0 = exact)")
    group.add_argument("--lookup", action="store_true",
                       help="RAPID: try free n-gram lookup drafts from the retrieved context first")
    add_rag_read_option(group)
    group.add_argument("--answer-style", choices=list(STYLES),
                       help="how the answer is asked to be shaped: brief (default) or lead (the answer in the "
                       "first sentence, then one sentence of support); an instruction after the question")


def add_rag_read_option(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    parser.add_argument("--rag-read", choices=RAG_READS,
                        help=f"how the rag method's target reads its passages: {RAG_READ_CHUNK_KV} (default) "
                        "assembles each passage's KV, stored once per chunk, and prefills only the question; "
                        f"{RAG_READ_JOINT} prefills the passages together for every question (exact, slower)")


def add_store_options(parser: argparse.ArgumentParser) -> None:
    """Where the corpus's shared state lives: several processes (two `ask serve`) can serve one corpus
    from the same --index folder, Chroma server and --kv-dir."""
    group = parser.add_argument_group("shared storage")
    group.add_argument("--chroma-url", metavar="URL",
                       help="keep the index's vectors on this Chroma server (`chroma run`), e.g. "
                       "http://127.0.0.1:8000, instead of inside the index folder")
    group.add_argument("--kv-dir", type=Path, metavar="DIR",
                       help="folder of the documents' cached KV (default $RAPIDQA_HOME/kv)")


def add_question_options(parser: argparse.ArgumentParser) -> None:
    """Where the documents are and how answers are shown: shared by `ask` and `ask chat`."""
    parser.add_argument("--docs", nargs="+", type=Path, metavar="PATH",
                        help="documents or folders to ingest first (PDF, TXT, MD, HTML, DOCX)")
    parser.add_argument("--index", type=Path, metavar="DIR",
                        help="persistent index directory (default: one kept per --docs set)")
    parser.add_argument("--compare", action="store_true",
                        help="also run LC on the same input and report the measured speedup")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    add_store_options(parser)
    add_model_options(parser)
    add_decoding_options(parser)



def settings_from_args(args: argparse.Namespace) -> Settings:
    """Settings with every option the user gave; options a command does not declare keep their defaults."""
    settings = Settings()
    models = settings.models
    if getattr(args, "fast", False):
        models = replace(models, target="qwen2.5-coder-0.5b", drafter="qwen2.5-coder-0.5b")
    for field in ("target", "drafter", "dtype", "device"):
        if getattr(args, field, None):
            models = replace(models, **{field: getattr(args, field)})
    decoding = settings.decoding
    if getattr(args, "mode", None):
        decoding = PRESETS[args.mode].apply(decoding)
    for field in ("method", "max_new_tokens", "temperature", "top_p", "seed", "gamma", "eta"):
        value = getattr(args, field, None)
        if value is not None:
            decoding = replace(decoding, **{field: value})
    if getattr(args, "lookup", False):
        decoding = replace(decoding, lookup_in_rapid=True)
    retrieval = settings.retrieval
    if getattr(args, "chroma_url", None):
        retrieval = replace(retrieval, chroma_url=args.chroma_url)
    kv_dir = getattr(args, "kv_dir", None) or settings.kv_dir
    rag_read = getattr(args, "rag_read", None) or settings.rag_read
    kv_dtype = getattr(args, "kv_dtype", None) or settings.kv_dtype
    answer_style = getattr(args, "answer_style", None) or settings.answer_style
    return replace(settings, models=models, decoding=decoding, retrieval=retrieval, kv_dir=kv_dir, rag_read=rag_read,
                   kv_dtype=kv_dtype, answer_style=answer_style)


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


def index_dir_for(args: argparse.Namespace, settings: Settings) -> Path:
    """--index, or one index kept per set of --docs paths (so asking again does not re-ingest)."""
    if args.index:
        return args.index
    if args.docs:
        key = hashlib.sha256("\n".join(sorted(str(p.resolve()) for p in args.docs)).encode()).hexdigest()[:16]
        return settings.home / "indexes" / key
    raise CliError("no documents: pass --docs FILE... to ingest, or --index DIR for an existing index")


def ingest_documents(index: HybridIndex, paths: Sequence[Path], progress: bool, engine: Engine | None = None) -> None:
    """Add files and folders; a bad file is reported and skipped, but nothing indexable is an error.

    With an engine, the documents' KV (the target's prefix, the drafter's chunks) is built too.
    """
    results = engine.ingest(index, paths, progress) if engine else index.add_files(paths, progress=progress)
    for result in results:
        if not result.ok:
            log(f"skipped {result.source}: {result.message}")
    if not any(r.ok for r in results):
        raise CliError("none of the documents could be indexed")


def engine_and_index(args: argparse.Namespace) -> tuple[Settings, Engine, HybridIndex]:
    """What a question asked from the terminal needs, from its parsed options: the settings, an
    engine and the index, with --docs ingested first (ask and ask chat)."""
    settings = settings_from_args(args)
    check_document_args(args)
    index_dir = index_dir_for(args, settings)
    settings.decoding.validate()

    from app.pipeline import Engine  # torch takes seconds to import: not before the arguments are known good
    from app.warm_up import start_warm_up

    engine = Engine(settings, log=log)
    start_warm_up(engine, settings.decoding.method)  # the drafter loads beside the target
    index = engine.open_index(index_dir)
    if args.docs:
        ingest_documents(index, args.docs, progress=True, engine=engine)
    return settings, engine, index
