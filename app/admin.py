"""`ask ingest | docs | delete | models`: index and model housekeeping."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from app.config import Settings
from app.errors import CliError
from app.options import add_model_options, add_store_options, settings_from_args
from app.registry import resolve_model


def _index_parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"ask {prog}", description=description)
    parser.add_argument("--index", type=Path, metavar="DIR", help="index directory (default $RAPIDQA_HOME/index)")
    add_store_options(parser)
    return parser


def main(name: str, argv: Sequence[str]) -> int:
    if name == "models":
        parser = argparse.ArgumentParser(prog="ask models", description="Fetch and convert the embedded models.")
        parser.add_argument("names", nargs="*", help="models to prepare (default: the target and drafter)")
        parser.add_argument("--dense", action="store_true",
                            help="also convert the bf16 weights (a GPU or --dtype reads them; converted at first "
                                 "use otherwise)")
        add_model_options(parser)
        args = parser.parse_args(argv)
        settings = settings_from_args(args)
        from decoding.loading import pick_device, wants_quantized  # torch: not before the arguments are known good

        # What this machine's engine reads: the quantized weights on a CPU, bf16 weights elsewhere.
        dense = args.dense or not wants_quantized(settings.models.dtype, pick_device(settings.models.device))
        return prepare_models(settings, args.names or [settings.models.target, settings.models.drafter], dense)

    descriptions = {
        "ingest": "Add documents (files or folders) to an index; unchanged files are skipped.",
        "docs": "List the documents of an index.",
        "delete": "Remove a document (by file name or id) from an index.",
    }
    parser = _index_parser(name, descriptions[name])
    if name == "ingest":
        parser.add_argument("paths", nargs="+", type=Path)
    if name == "delete":
        parser.add_argument("document")
    add_model_options(parser)
    args = parser.parse_args(argv)
    settings = settings_from_args(args)

    from app.pipeline import Engine  # torch: only the commands that open an index import it

    engine = Engine(settings, log=lambda m: print(m, file=sys.stderr))
    index = engine.open_index(args.index)
    if name == "ingest":
        results = engine.ingest(index, args.paths, progress=True)
        for r in results:
            print(f"{r.status:9s} {r.source}" + (f": {r.message}" if r.message else ""))
        return 0 if all(r.ok for r in results) else 1
    if name == "delete":
        if not engine.delete(index, args.document):
            raise CliError(f"no document {args.document!r} in the index")
        print(f"deleted {args.document}")
        return 0
    for doc in index.documents():
        print(f"{doc.source}\t{doc.n_pages} pages\t{doc.n_chunks} chunks\t{doc.n_tokens} tokens\t{doc.doc_id}")
    return 0


def prepare_models(settings: Settings, names: list[str], dense: bool = False) -> int:
    for name in dict.fromkeys(names):
        path = resolve_model(name, settings.models_dir, dense=dense)
        size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
        print(f"{name}: ready in {path} ({size / 1e9:.2f} GB)")
    return 0
