"""The OpenAI-compatible API (app.api) on the `ask serve` app: the official client, raw SSE, refusals."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.ui_helpers import ScriptedEngine, serving, wait_until

pytestmark = pytest.mark.timeout(300)
KEY = "sk-test-4f1c"
ANSWER = "".join(ScriptedEngine.ANSWER)


def _serve(tmp_path: Path, api_key: str | None) -> Iterator[tuple[ScriptedEngine, str]]:
    from app.api import api_routes
    from ui.blocks import build_app

    engine = ScriptedEngine(tmp_path / "home")
    index = engine.open_index()
    with serving(build_app(engine), engine.settings, api_routes(engine, index, api_key, keepalive_s=0.2)) as url:
        yield engine, url


@pytest.fixture
def api(tmp_path: Path) -> Iterator[tuple[ScriptedEngine, str]]:
    yield from _serve(tmp_path, KEY)


def openai_client(url: str, key: str = KEY) -> Any:
    from openai import OpenAI

    return OpenAI(base_url=f"{url}v1", api_key=key, max_retries=0, timeout=60)


def post(url: str, body: dict[str, Any], key: str | None = KEY) -> Any:
    import httpx

    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{url}v1/chat/completions", json=body, headers=headers, timeout=60)


def sse_events(url: str, body: dict[str, Any]) -> list[str]:
    """Every event of a streamed answer as sent: the data lines and the comment lines."""
    import httpx

    with httpx.stream("POST", f"{url}v1/chat/completions", json=body | {"stream": True},
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        text = "".join(response.iter_text())
    assert text.endswith("\n\n"), "every event ends with a blank line"
    return text[:-2].split("\n\n")


def ask(question: str = "What version?", **extra: Any) -> dict[str, Any]:
    return {"model": "rapidqa", "messages": [{"role": "user", "content": question}], **extra}


def test_models_lists_the_answer_modes(api: tuple[ScriptedEngine, str]) -> None:
    _, url = api
    names = [m.id for m in openai_client(url).models.list()]
    assert names == ["rapidqa", "rapidqa-fast", "rapidqa-passages"]


def test_openai_client_without_streaming_gets_answer_and_sources(api: tuple[ScriptedEngine, str]) -> None:
    engine, url = api
    response = openai_client(url).chat.completions.create(
        model="rapidqa", messages=[{"role": "user", "content": "What version?"}])
    assert response.choices[0].message.content == ANSWER
    assert response.choices[0].finish_reason == "stop"
    extension = response.to_dict()["rapidqa"]
    assert extension["sources"][0]["document"] == "manual.pdf" and extension["sources"][0]["page"] == 2
    assert extension["stats"]["generated"] == 6 and extension["stats"]["method"] == "rapid"
    assert response.usage.completion_tokens == 6 and response.usage.prompt_tokens == 600
    question, decoding, compare = engine.questions[-1]
    assert (question, decoding, compare) == ("What version?", engine.settings.decoding, False)


def test_openai_client_streams_answer_then_sources(api: tuple[ScriptedEngine, str]) -> None:
    _, url = api
    stream = openai_client(url).chat.completions.create(
        model="rapidqa-passages", messages=[{"role": "user", "content": "What version?"}], stream=True,
        stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == ANSWER
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == "stop"
    extension = finals[0].to_dict()["rapidqa"]
    assert extension["sources"][0]["excerpt"].startswith("This manual is for R")
    assert extension["stats"]["method"] == "rapid-self"  # the passages mode's method
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6


def test_sse_framing(api: tuple[ScriptedEngine, str]) -> None:
    _, url = api
    events = sse_events(url, ask())
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1] if not e.startswith(":")]
    assert all(e.startswith("data: {") or e.startswith(": ") for e in events[:-1])
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == "rapidqa" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    pieces = [c["choices"][0]["delta"].get("content") for c in chunks[1:]]
    assert "".join(p for p in pieces if p) == ANSWER
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop" and "rapidqa" in chunks[-1]
    assert all("rapidqa" not in c or "sources" not in c["rapidqa"] for c in chunks[:-1])


def test_prefill_wait_streams_progress_and_keepalives(api: tuple[ScriptedEngine, str]) -> None:
    _, url = api
    events = sse_events(url, ask("prefill first"))
    assert ": keep-alive" in events
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1] if not e.startswith(":")]
    progress = [c["rapidqa"]["progress"] for c in chunks if "progress" in c.get("rapidqa", {})]
    assert [p["done"] for p in progress] == [0, 40, 80] and progress[-1]["total"] == 120
    assert progress[-1]["eta_s"] == pytest.approx(1.0)
    assert all(c["choices"][0]["delta"] == {} for c in chunks if "progress" in c.get("rapidqa", {}))


def test_a_conversation_reaches_the_engine_and_its_rewrite_comes_back(api: tuple[ScriptedEngine, str]) -> None:
    from app.conversation import Turn

    engine, url = api
    messages = [{"role": "user", "content": "What version?"}, {"role": "assistant", "content": "4.2.2."},
                {"role": "user", "content": [{"type": "text", "text": "And its date?"}]}]
    response = openai_client(url).chat.completions.create(model="rapidqa", messages=messages)
    assert engine.histories[-1] == (Turn("What version?", "4.2.2."),)
    assert engine.questions[-1][0] == "And its date?"
    conversation = response.to_dict()["rapidqa"]["conversation"]
    assert conversation["standalone_question"] == "And its date? (after: What version?)"
    assert conversation["history_turns"] == 1 and conversation["history_dropped"] == 0
    assert post(url, ask()).json()["rapidqa"]["conversation"] is None


def test_settings_map_onto_decoding(api: tuple[ScriptedEngine, str]) -> None:
    engine, url = api
    response = post(url, ask(temperature=0.7, top_p=0.9, seed=11, max_tokens=9))
    assert response.status_code == 200, response.text
    _, decoding, _ = engine.questions[-1]
    assert (decoding.temperature, decoding.top_p, decoding.seed, decoding.max_new_tokens) == (0.7, 0.9, 11, 9)


def test_stop_sequence_ends_the_answer_and_its_work(api: tuple[ScriptedEngine, str]) -> None:
    engine, url = api
    body = post(url, ask(stop=["R ver"])).json()
    assert body["choices"][0]["message"]["content"] == "The manual is for "
    assert body["choices"][0]["finish_reason"] == "stop" and body["rapidqa"]["stopped_by"] == "stop sequence"
    assert body["rapidqa"]["sources"]
    assert engine.closed == 1  # the generator was closed at the stop, not run to its end


def test_401_without_the_key(api: tuple[ScriptedEngine, str]) -> None:
    import httpx
    import openai

    engine, url = api
    for key in (None, "sk-wrong"):
        response = post(url, ask(), key=key)
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{url}v1/models").status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai_client(url, key="sk-wrong").chat.completions.create(model="rapidqa", messages=ask()["messages"])
    assert engine.questions == []


def test_no_key_needed_when_none_is_set(tmp_path: Path) -> None:
    for _, url in _serve(tmp_path, None):
        assert post(url, ask(), key=None).status_code == 200


@pytest.mark.parametrize(("extra", "param"), [
    ({"n": 2}, "n"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
    ({"logprobs": True}, "logprobs"),
    ({"frequency_penalty": 0.5}, "frequency_penalty"),
    ({"temperature": 3}, "temperature"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"best_of": 2}, "best_of"),
])
def test_unsupported_options_are_refused_openai_style(api: tuple[ScriptedEngine, str], extra: dict[str, Any],
                                                      param: str) -> None:
    engine, url = api
    response = post(url, ask(**extra))
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["message"]
    assert engine.questions == []


def test_openai_client_sees_the_refusal(api: tuple[ScriptedEngine, str]) -> None:
    import openai

    _, url = api
    with pytest.raises(openai.BadRequestError, match="n=1"):
        openai_client(url).chat.completions.create(model="rapidqa", messages=ask()["messages"], n=2)
    with pytest.raises(openai.NotFoundError, match="rapidqa-passages"):
        openai_client(url).chat.completions.create(model="gpt-4o", messages=ask()["messages"])


def test_bad_messages_and_questions_are_400(api: tuple[ScriptedEngine, str]) -> None:
    _, url = api
    bad = [
        {"model": "rapidqa", "messages": []},
        {"model": "rapidqa", "messages": [{"role": "system", "content": "be terse"}, {"role": "user", "content": "q"}]},
        {"model": "rapidqa", "messages": [{"role": "assistant", "content": "hello"}]},
        {"model": "rapidqa", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
        ask("   "),
    ]
    for body in bad:
        response = post(url, body)
        assert response.status_code == 400, (body, response.text)
    assert "empty" in post(url, ask("   ")).json()["error"]["message"]


def test_unexpected_errors_say_nothing_of_internals(api: tuple[ScriptedEngine, str]) -> None:
    _, url = api
    response = post(url, ask("boom"))
    assert response.status_code == 500
    assert "secret internal detail" not in response.text and response.json()["error"]["type"] == "server_error"
    events = sse_events(url, ask("boom"))  # the failure comes after the sources: in the stream
    assert events[-1] == "data: [DONE]"
    error = json.loads(events[-2].removeprefix("data: "))["error"]
    assert "secret internal detail" not in error["message"] and error["type"] == "server_error"


def test_a_closed_stream_stops_the_answer(api: tuple[ScriptedEngine, str]) -> None:
    import httpx

    engine, url = api
    started = time.monotonic()
    with httpx.stream("POST", f"{url}v1/chat/completions", json=ask("slow one", stream=True),
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as response:
        for line in response.iter_lines():
            if '"content": "The manual "' in line:
                break  # the first piece of the answer: hang up
    # The script sleeps 2 s after each of its 3 pieces: closed, the generator ends well before 6 s.
    assert wait_until(lambda: engine.closed == 1, 5), (engine.closed, engine.finished)
    assert time.monotonic() - started < 5.5


def test_a_client_gone_before_a_whole_answer_stops_it(api: tuple[ScriptedEngine, str]) -> None:
    import httpx

    engine, url = api
    with pytest.raises(httpx.TimeoutException):  # gives up after 1 s of a 6 s answer
        httpx.post(f"{url}v1/chat/completions", json=ask("slow one"), headers={"Authorization": f"Bearer {KEY}"},
                   timeout=1.0)
    assert wait_until(lambda: engine.closed == 1, 5), (engine.closed, engine.finished)


def test_serve_needs_a_key_beyond_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    from ui.serve import serve_parser, settings_for_serve

    monkeypatch.delenv("RAPIDQA_API_KEY", raising=False)
    with pytest.raises(ValueError, match="--api-key"):
        settings_for_serve(serve_parser().parse_args(["--host", "0.0.0.0"]))
    assert settings_for_serve(serve_parser().parse_args(["--host", "0.0.0.0", "--api-key", KEY])).server.api_key == KEY
    assert not settings_for_serve(serve_parser().parse_args(["--host", "0.0.0.0", "--no-api"])).server.api
    monkeypatch.setenv("RAPIDQA_API_KEY", "from-env")
    assert settings_for_serve(serve_parser().parse_args(["--host", "0.0.0.0"])).server.api_key == "from-env"
    assert settings_for_serve(serve_parser().parse_args([])).server.api


def test_stop_text_holds_back_a_split_stop_sequence() -> None:
    from app.stop_text import StopText

    scanner = StopText(["\nQuestion:"])
    shown = [scanner.feed(piece) for piece in ("The answer", " is 4.\nQue", "stion: next")]
    assert shown == ["The answer", " is 4.", ""] and scanner.stopped
    scanner = StopText(["\nQuestion:"])
    assert scanner.feed("a\nQue") == "a" and scanner.feed("ry") == "\nQuery" and scanner.flush() == ""
    scanner = StopText(["END"])
    assert scanner.feed("almost EN") == "almost " and scanner.flush() == "EN"
