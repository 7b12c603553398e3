"""The options that point several processes at one corpus's shared state (`ask serve`, `ask ingest`, `ask`)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from app.config import Settings
from retrieval.errors import RetrievalError
from retrieval.index import HybridIndex
from retrieval.types import RetrievalSettings
from tests.retrieval_fixtures import HashEmbedder, word_tokens


def test_serve_takes_a_chroma_server_and_a_kv_folder(tmp_path: Path) -> None:
    from ui.serve import serve_parser, settings_for_serve

    args = serve_parser().parse_args(["--chroma-url", "http://127.0.0.1:8123", "--kv-dir", str(tmp_path / "kv"),
                                      "--index", str(tmp_path / "index")])
    settings = settings_for_serve(args)
    assert settings.retrieval.chroma_url == "http://127.0.0.1:8123"
    assert settings.kv_cache_dir == tmp_path / "kv"


def test_the_question_and_index_commands_take_them_too(tmp_path: Path) -> None:
    from app.options import settings_from_args
    from cli.main import question_parser

    args = question_parser().parse_args(["Why?", "--index", str(tmp_path), "--chroma-url", "http://h:1",
                                         "--kv-dir", str(tmp_path / "kv")])
    settings = settings_from_args(args)
    assert (settings.retrieval.chroma_url, settings.kv_cache_dir) == ("http://h:1", tmp_path / "kv")
    assert Settings(home=tmp_path).kv_cache_dir == tmp_path / "kv"  # the default stays under the home


def test_an_unreachable_chroma_server_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    settings = RetrievalSettings(chroma_url=f"http://127.0.0.1:{port}")
    with pytest.raises(RetrievalError, match="Could not reach the Chroma server"):
        HybridIndex(tmp_path / "index", settings, word_tokens, HashEmbedder())  # type: ignore[arg-type]


def test_every_command_takes_the_kv_form(tmp_path: Path) -> None:
    """--kv-dtype on `ask`, `ask chat`, `ask serve`, `ask eval` and `ask ingest`: it reaches Settings."""
    import subprocess
    import sys

    from app.chat import chat_parser
    from app.eval.runner import parser as eval_parser
    from app.options import settings_from_args
    from cli.main import question_parser
    from ui.serve import serve_parser, settings_for_serve

    assert Settings().kv_dtype == "auto"
    for form in ("q8", "bf16"):
        assert settings_from_args(question_parser().parse_args(["Why?", "--kv-dtype", form])).kv_dtype == form
        assert settings_from_args(chat_parser().parse_args(["--kv-dtype", form])).kv_dtype == form
        assert settings_for_serve(serve_parser().parse_args(["--kv-dtype", form])).kv_dtype == form
        eval_args = eval_parser().parse_args(["--kv-dtype", form, "--docs", str(tmp_path)])
        assert settings_from_args(eval_args).kv_dtype == form
    assert settings_from_args(question_parser().parse_args(["Why?"])).kv_dtype == "auto"
    with pytest.raises(SystemExit):
        question_parser().parse_args(["Why?", "--kv-dtype", "q4"])
    ingest = subprocess.run([sys.executable, "-m", "cli.main", "ingest", "--help"], capture_output=True, text=True,
                            timeout=120)
    assert ingest.returncode == 0 and "--kv-dtype {auto,q8,bf16}" in ingest.stdout
