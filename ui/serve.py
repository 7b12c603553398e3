"""`ask serve`: load the models, build the page and serve it (never through a share link)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import gradio as gr
from starlette.routing import BaseRoute

from app.api import api_routes
from app.config import Settings
from app.options import (
    add_decoding_options,
    add_model_options,
    add_store_options,
    log,
    quiet_environment,
    settings_from_args,
)
from app.pipeline import Engine
from ui.blocks import build_app


def load_models(engine: Engine) -> None:
    """Load everything before the first visitor, so no request pays for it."""
    _ = engine.target, engine.draft_model
    engine.embedder.embed_query("warm up")


def theme() -> gr.themes.Base:
    # System fonts: the default theme fetches Google Fonts, a request to a third party from a local app.
    return gr.themes.Soft(font=["ui-sans-serif", "system-ui", "sans-serif"],
                          font_mono=["ui-monospace", "monospace"])


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def launch(demo: gr.Blocks, settings: Settings, *, prevent_thread_lock: bool = False,
           routes: Sequence[BaseRoute] = ()) -> tuple[Any, str, str]:
    """Queue and serve on settings.server; never through a share link. As many requests of one kind
    run at once as the scheduler decodes together (settings.max_sessions); the rest wait in the queue.
    `routes` (the /v1 API) are served by the same app, ahead of Gradio's own."""
    server = settings.server
    return demo.queue(default_concurrency_limit=settings.max_sessions).launch(
        app_kwargs={"routes": list(routes)},
        server_name=server.host, server_port=server.port, auth=server.auth, share=False,
        max_file_size=settings.limits.max_upload_bytes, prevent_thread_lock=prevent_thread_lock,
        theme=theme(), show_error=False, ssr_mode=False, mcp_server=False, pwa=False,
        enable_monitoring=False, quiet=prevent_thread_lock,
    )


def parse_auth(text: str) -> tuple[str, str]:
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise ValueError("auth must be USER:PASSWORD with both parts non-empty")
    return user, password


def serve_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ask serve",
        description="Start the rapidqa web UI (Gradio). It listens on 127.0.0.1 only unless --host says otherwise.",
    )
    parser.add_argument("--host", help="address to listen on (default 127.0.0.1, this machine only; "
                        "0.0.0.0 exposes it to the network: set --auth then)")
    parser.add_argument("--port", type=int, help="port (default 7860)")
    parser.add_argument("--auth", metavar="USER:PASSWORD",
                        help="require this login (default: $RAPIDQA_AUTH if set, else no login)")
    parser.add_argument("--index", type=Path, metavar="DIR",
                        help="index directory (default $RAPIDQA_HOME/index)")
    parser.add_argument("--api-key", metavar="KEY",
                        help="Bearer token the OpenAI-compatible /v1 API requires (default: $RAPIDQA_API_KEY; "
                        "required when --host is not loopback)")
    parser.add_argument("--no-api", action="store_true",
                        help="do not serve the OpenAI-compatible /v1/models and /v1/chat/completions")
    parser.add_argument("--max-sessions", type=int, metavar="N",
                        help="questions answered at once, their model passes batched (default 8); "
                        "more wait in the queue")
    add_store_options(parser)
    add_model_options(parser)
    add_decoding_options(parser)
    return parser


def settings_for_serve(args: argparse.Namespace) -> Settings:
    settings = settings_from_args(args)
    server = settings.server
    auth_text = args.auth if args.auth is not None else os.environ.get("RAPIDQA_AUTH") or None
    server = replace(
        server,
        host=args.host or server.host,
        port=args.port or server.port,
        auth=parse_auth(auth_text) if auth_text else None,
        api=not args.no_api,
        api_key=args.api_key if args.api_key is not None else os.environ.get("RAPIDQA_API_KEY") or None,
    )
    if server.api and server.api_key is None and server.host not in LOOPBACK:
        raise ValueError(f"--host {server.host} would serve the /v1 API to the network without a key: "
                         "set --api-key (or $RAPIDQA_API_KEY), or --no-api")
    if args.max_sessions is not None and args.max_sessions < 1:
        raise ValueError("--max-sessions must be at least 1")
    return replace(settings, server=server, max_sessions=args.max_sessions or settings.max_sessions)


def main(argv: Sequence[str] | None = None) -> int:
    quiet_environment()
    parser = serve_parser()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        settings = settings_for_serve(args)
    except ValueError as error:
        parser.error(str(error))
    settings.decoding.validate()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if settings.server.host not in LOOPBACK and settings.server.auth is None:
        print(f"warning: listening on {settings.server.host} without --auth: anyone who can reach this "
              "port can read and change the documents.", file=sys.stderr)

    engine = Engine(settings, log=log)
    log("loading models…")
    load_models(engine)
    demo = build_app(engine, args.index)
    server = settings.server
    routes = api_routes(engine, engine.open_index(args.index), server.api_key) if server.api else []
    launch(demo, settings, routes=routes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
