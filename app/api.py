"""OpenAI-compatible routes on the `ask serve` process: GET /v1/models, POST /v1/chat/completions.

They answer through Engine.answer, the entry the UI uses, over the same index. A streamed answer is
server-sent events in OpenAI's chunk format ending `data: [DONE]`; while the question waits (the
documents' prefill, an earlier question) chunks with an empty delta carry `rapidqa.status` and
`rapidqa.progress`, and comment lines keep the connection alive. The final chunk, and the
non-streamed response, carry `rapidqa`: sources, statistics, the part of the corpus read
(app.openai_chunks). A client that goes away stops the answer: its generator is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator, Generator, Iterator, Sequence
from typing import Any, Protocol

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute

from app.config import Settings
from app.conversation import Turn
from app.errors import user_message
from app.events import Event
from app.openai_chunks import EXTENSION, Final, Note, Piece, Text, completion
from app.openai_request import ApiError, ChatRequest, model_names, parse_chat_request
from decoding.settings import DecodingSettings
from retrieval.index import HybridIndex
from retrieval.types import RetrievalSettings

logger = logging.getLogger("rapidqa.api")
KEEPALIVE_S = 5.0  # a comment line this often while nothing else is sent keeps proxies from closing the stream
_END = object()
Pieces = Generator[Piece, None, None]


class Answering(Protocol):
    """What the routes need of app.pipeline.Engine."""

    settings: Settings

    def answer(self, question: str, index: HybridIndex, decoding: DecodingSettings | None = None,
               compare: bool = False, retrieval: RetrievalSettings | None = None,
               history: Sequence[Turn] = ()) -> Iterator[Event]: ...


def api_routes(engine: Answering, index: HybridIndex, api_key: str | None,
               keepalive_s: float = KEEPALIVE_S) -> list[BaseRoute]:
    """The /v1 routes; with `api_key`, each request must carry `Authorization: Bearer <api_key>`."""
    router = APIRouter()
    created = int(time.time())

    @router.get("/v1/models")
    async def models(request: Request) -> Response:
        if (refused := _unauthorized(request, api_key)) is not None:
            return refused
        data = [{"id": name, "object": "model", "created": created, "owned_by": "rapidqa"} for name in model_names()]
        return JSONResponse({"object": "list", "data": data})

    @router.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        if (refused := _unauthorized(request, api_key)) is not None:
            return refused
        try:
            body = await request.json()
        except ValueError:
            return _error(ApiError(400, "The request body is not valid JSON."))
        try:
            chat = parse_chat_request(body, engine.settings.decoding)
            pieces = completion(engine.answer(chat.question, index, chat.decoding, history=chat.history), chat.stop)
            first = await asyncio.to_thread(next, pieces, _END)  # retrieval's errors become a status code
        except Exception as error:
            return _error(_api_error(error))
        head = "chatcmpl-" + uuid.uuid4().hex
        if chat.stream:
            frames = _sse(_pieces(first, pieces, request, keepalive_s), chat, head)
            return StreamingResponse(frames, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await _whole(first, pieces, request, chat, head)

    return list(router.routes)


def _unauthorized(request: Request, api_key: str | None) -> Response | None:
    if api_key is None:
        return None
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and secrets.compare_digest(given.strip().encode(), api_key.encode()):
        return None
    error = ApiError(401, "Missing or incorrect API key: send 'Authorization: Bearer <key>' (ask serve --api-key).",
                     code="invalid_api_key")
    return _error(error, {"WWW-Authenticate": "Bearer"})


def _error(error: ApiError, headers: dict[str, str] | None = None) -> Response:
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


def _api_error(error: Exception) -> ApiError:
    if isinstance(error, ApiError):
        return error
    message = user_message(error)
    if message is None:
        logger.error("answering through the API failed", exc_info=error)
        return ApiError(500, "The server failed to answer; its log has the details.", kind="server_error")
    return ApiError(400, message)


async def _pieces(first: Any, pieces: Pieces, request: Request, keepalive_s: float,
                  ) -> AsyncIterator[Piece | None]:
    """The answer's pieces, computed in a worker thread; None when `keepalive_s` passed without one.
    Ends early when the client has gone, and then closes `pieces` (the engine's generator)."""
    task: asyncio.Future[Any] | None = None
    try:
        item = first
        while item is not _END:
            yield item
            task = asyncio.ensure_future(asyncio.to_thread(next, pieces, _END))
            while not (await asyncio.wait({task}, timeout=keepalive_s))[0]:
                if await request.is_disconnected():
                    return
                yield None
            item, task = task.result(), None
            if await request.is_disconnected():
                return
    finally:
        _close_when_idle(pieces, task)


def _close_when_idle(pieces: Pieces, task: asyncio.Future[Any] | None) -> None:
    """Close the generator now, or as soon as the step running in the worker thread returns
    (a generator cannot be closed while it runs)."""
    if task is None or task.done():
        pieces.close()
    else:
        task.add_done_callback(lambda _: pieces.close())


async def _sse(pieces: AsyncIterator[Piece | None], chat: ChatRequest, head: str) -> AsyncIterator[str]:
    created = int(time.time())

    def chunk(delta: dict[str, Any], reason: str | None = None, **extra: Any) -> str:
        body = {"id": head, "object": "chat.completion.chunk", "created": created, "model": chat.model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": reason}], **extra}
        return f"data: {json.dumps(body)}\n\n"

    yield chunk({"role": "assistant", "content": ""})
    try:
        async for piece in pieces:
            if piece is None:
                yield ": keep-alive\n\n"
            elif isinstance(piece, Note):
                yield chunk({}, **{EXTENSION: piece.record})
            elif isinstance(piece, Text):
                yield chunk({"content": piece.text})
            elif isinstance(piece, Final):
                yield chunk({}, piece.finish_reason, **{EXTENSION: piece.record})
                if chat.include_usage:
                    body = {"id": head, "object": "chat.completion.chunk", "created": created, "model": chat.model,
                            "choices": [], "usage": piece.usage}
                    yield f"data: {json.dumps(body)}\n\n"
    except Exception as error:  # after the first byte the status is sent: the error travels as an event
        yield f"data: {json.dumps(_api_error(error).body())}\n\n"
    yield "data: [DONE]\n\n"


async def _whole(first: Any, pieces: Pieces, request: Request, chat: ChatRequest, head: str) -> Response:
    """The non-streamed response; the work stops if the client goes away while it waits."""
    gone = threading.Event()

    def collect() -> tuple[str, Final | None]:
        text: list[str] = []
        final = None
        with contextlib.closing(pieces):
            for piece in _chain(first, pieces):
                if gone.is_set():
                    return "", None
                if isinstance(piece, Text):
                    text.append(piece.text)
                elif isinstance(piece, Final):
                    final = piece
        return "".join(text), final

    work = asyncio.ensure_future(asyncio.to_thread(collect))
    while not (await asyncio.wait({work}, timeout=0.5))[0]:
        if await request.is_disconnected():
            gone.set()
    try:
        text, final = work.result()
    except Exception as error:
        return _error(_api_error(error))
    if final is None:
        return Response(status_code=499)  # nobody is listening any more
    return JSONResponse({
        "id": head, "object": "chat.completion", "created": int(time.time()), "model": chat.model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                     "finish_reason": final.finish_reason}],
        "usage": final.usage, EXTENSION: final.record,
    })


def _chain(first: Any, pieces: Iterator[Piece]) -> Iterator[Piece]:
    if first is _END:
        return
    yield first
    yield from pieces
