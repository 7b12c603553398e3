"""An OpenAI chat-completions request body, checked and turned into our settings.

Every field is either honoured or refused with an OpenAI-style error: a client that asks for
something we cannot do (n=2, tools, logprobs) must learn it, not receive a different answer.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from app.conversation import Turn
from app.presets import PRESETS
from decoding.settings import DecodingSettings

DEFAULT_MODEL = "rapidqa"  # the server's own settings (its --method, --eta, ... or their defaults)
MAX_STOPS = 4  # as OpenAI's API
# Fields accepted for their meaning below; everything else is refused by name.
KNOWN = {"model", "messages", "stream", "stream_options", "temperature", "top_p", "max_tokens",
         "max_completion_tokens", "stop", "seed", "n", "user"}
# Fields we cannot honour, and the values that mean "not asked for" (sent by some clients anyway).
UNSUPPORTED_UNLESS = {
    "tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []), "function_call": (None, "none"),
    "logprobs": (None, False), "top_logprobs": (None, 0), "logit_bias": (None, {}),
    "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0), "response_format": (None,),
    "parallel_tool_calls": (None,), "modalities": (None, ["text"]), "audio": (None,), "prediction": (None,),
    "reasoning_effort": (None,), "service_tier": (None, "auto", "default"), "store": (None, False),
    "metadata": (None,), "web_search_options": (None,),
}


class ApiError(Exception):
    """A request we refuse; rendered as OpenAI's error body with `status`."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class ChatRequest:
    model: str
    question: str  # the last user message
    history: tuple[Turn, ...]  # the exchanges before it, oldest first
    decoding: DecodingSettings
    stream: bool
    stop: tuple[str, ...]
    include_usage: bool


def model_names() -> list[str]:
    """What /v1/models lists: the server's settings, then each answer mode by name."""
    return [DEFAULT_MODEL, *(f"{DEFAULT_MODEL}-{name}" for name in PRESETS)]


def decoding_for_model(model: str, default: DecodingSettings) -> DecodingSettings:
    if model == DEFAULT_MODEL:
        return default
    preset = PRESETS.get(model.removeprefix(f"{DEFAULT_MODEL}-")) if model.startswith(f"{DEFAULT_MODEL}-") else None
    if preset is None:
        raise ApiError(404, f"The model '{model}' does not exist; /v1/models lists: {', '.join(model_names())}.",
                       "model", "model_not_found")
    return preset.apply(default)


def parse_chat_request(body: Any, default: DecodingSettings) -> ChatRequest:
    if not isinstance(body, dict):
        raise ApiError(400, "The request body must be a JSON object.")
    _refuse_unsupported(body)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "'model' is required (GET /v1/models lists them).", "model")
    decoding = _sampling(body, decoding_for_model(model, default))
    question, history = _conversation(body.get("messages"))
    stream = _typed(body, "stream", bool, False)
    options = _typed(body, "stream_options", dict, {})
    unknown_options = sorted(set(options) - {"include_usage"})
    if unknown_options:
        raise ApiError(400, f"stream_options.{unknown_options[0]} is not supported.", "stream_options")
    if options and not stream:
        raise ApiError(400, "stream_options is only allowed when stream is true.", "stream_options")
    include_usage = options.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise ApiError(400, "stream_options.include_usage must be a boolean.", "stream_options")
    return ChatRequest(model, question, history, decoding, stream, _stops(body.get("stop")), include_usage)


def _refuse_unsupported(body: dict[str, Any]) -> None:
    for name, value in body.items():
        if name in UNSUPPORTED_UNLESS:
            if not any(value == allowed and type(value) is type(allowed) for allowed in UNSUPPORTED_UNLESS[name]):
                raise ApiError(400, f"'{name}' is not supported by this server.", name, "unsupported_parameter")
        elif name not in KNOWN:
            raise ApiError(400, f"Unrecognized request argument supplied: {name}", name, "unsupported_parameter")
    n = body.get("n", 1)
    if n != 1 or isinstance(n, bool):
        raise ApiError(400, "Only n=1 is supported: one answer per request.", "n", "unsupported_value")


def _typed(body: dict[str, Any], name: str, kind: type, default: Any) -> Any:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise ApiError(400, f"'{name}' must be a {kind.__name__}.", name)
    return value


def _number(body: dict[str, Any], name: str, kind: type) -> Any:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or (kind is int and not isinstance(value, int)):
        raise ApiError(400, f"'{name}' must be {'an integer' if kind is int else 'a number'}.", name)
    return value


def _sampling(body: dict[str, Any], decoding: DecodingSettings) -> DecodingSettings:
    temperature = _number(body, "temperature", float)
    if temperature is not None:
        if not 0 <= temperature <= 2:
            raise ApiError(400, "'temperature' must be between 0 and 2.", "temperature")
        decoding = replace(decoding, temperature=float(temperature))
    top_p = _number(body, "top_p", float)
    if top_p is not None:
        if not 0 < top_p <= 1:
            raise ApiError(400, "'top_p' must be in (0, 1].", "top_p")
        decoding = replace(decoding, top_p=float(top_p))
    seed = _number(body, "seed", int)
    if seed is not None:
        decoding = replace(decoding, seed=seed)
    if body.get("max_tokens") is not None and body.get("max_completion_tokens") is not None:
        raise ApiError(400, "Give max_tokens or max_completion_tokens, not both.", "max_tokens")
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _number(body, name, int)
    if max_tokens is not None:
        if max_tokens < 1:
            raise ApiError(400, f"'{name}' must be at least 1.", name)
        decoding = replace(decoding, max_new_tokens=max_tokens)
    return decoding


def _stops(value: Any) -> tuple[str, ...]:
    stops = [value] if isinstance(value, str) else value if value is not None else []
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise ApiError(400, "'stop' must be a non-empty string or a list of them.", "stop")
    if len(stops) > MAX_STOPS:
        raise ApiError(400, f"'stop' takes at most {MAX_STOPS} sequences.", "stop")
    return tuple(stops)


def _text(message: dict[str, Any], where: str) -> str:
    """A message's content: a string, or a list of text parts (other part types are refused)."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ApiError(400, f"{where}: only text content is supported.", "messages")
            texts.append(part["text"])
        return "".join(texts)
    raise ApiError(400, f"{where}: 'content' must be a string or a list of text parts.", "messages")


def _conversation(messages: Any) -> tuple[str, tuple[Turn, ...]]:
    """messages -> (the last question, the exchanges before it). The system prompt is ours (it tells
    the model to answer from the documents), so a client's system message is refused, not dropped."""
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list.", "messages")
    roles, texts = [], []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ApiError(400, f"messages[{i}] must be an object.", "messages")
        role = message.get("role")
        if role in ("system", "developer"):
            raise ApiError(400, f"messages[{i}]: {role} messages are not supported; this server answers from "
                           "its documents with its own instructions.", "messages", "unsupported_value")
        if role not in ("user", "assistant"):
            raise ApiError(400, f"messages[{i}]: role {role!r} is not supported (user and assistant are).",
                           "messages", "unsupported_value")
        roles.append(role)
        texts.append(_text(message, f"messages[{i}]"))
    expected = ["user", "assistant"] * (len(messages) // 2) + ["user"]
    if roles != expected[: len(roles)] or roles[-1] != "user":
        raise ApiError(400, "messages must alternate user and assistant, starting and ending with user.",
                       "messages")
    turns = tuple(Turn(texts[i], texts[i + 1]) for i in range(0, len(texts) - 1, 2))
    return texts[-1], turns
