"""Pass-through beyond chat: ``/v1/responses`` and ``/v1/completions`` reach an upstream that has them,
and a stream the upstream gzips reaches the client decoded.
"""

from __future__ import annotations

import json
import zlib
from typing import Any

import httpx
import openai
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from markov_rsa import RSAConfig
from markov_rsa.backends.openai import OpenAIBackend, RetryPolicy
from markov_rsa.server import ServerSettings, create_app
from tests.servers import serve_app, sse_chunks

FAST = RetryPolicy(max_attempts=2, initial_backoff=0.01, max_backoff=0.02)
SMALL = RSAConfig(population=2, k=2, rounds=1, budget=64, tail=16, seed=0, task="math", preset="small")
HELLO = [{"role": "user", "content": "What is 2 + 2?"}]
CHAT = {"id": "chatcmpl-up", "object": "chat.completion", "model": "up-model", "created": 0,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Four, as it happens."},
                     "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9}}
TEXT = {"id": "cmpl-up", "object": "text_completion", "model": "up-model", "created": 0,
        "choices": [{"index": 0, "text": " four", "finish_reason": "stop", "logprobs": None}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}}
RESPONSE = {"id": "resp_up", "object": "response", "created_at": 0, "status": "completed", "model": "up-model",
            "output": [{"type": "message", "id": "msg_up", "status": "completed", "role": "assistant",
                        "content": [{"type": "output_text", "text": "Four.", "annotations": []}]}],
            "parallel_tool_calls": True, "tool_choice": "auto", "tools": [],
            "usage": {"input_tokens": 5, "output_tokens": 2, "total_tokens": 7}}


def gzipped(pieces: list[bytes]) -> StreamingResponse:
    """An SSE stream compressed as it goes (as servers behind a compressing proxy send it)."""

    async def body() -> Any:
        packer = zlib.compressobj(wbits=31)
        for piece in pieces:
            yield packer.compress(piece) + packer.flush(zlib.Z_SYNC_FLUSH)
        yield packer.flush()

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Content-Encoding": "gzip"})


class Upstream:
    """A loopback upstream with chat (its streams gzipped), text completions and the Responses API."""

    def __init__(self, responses: bool = True) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.responses = responses

    def app(self) -> Starlette:
        routes = [Route("/v1/chat/completions", self.chat, methods=["POST"]),
                  Route("/v1/completions", self.completions, methods=["POST"])]
        if self.responses:
            routes.append(Route("/v1/responses", self.respond, methods=["POST"]))
        return Starlette(routes=routes)

    async def chat(self, request: Request) -> Response:
        body = await request.json()
        self.calls.append(("chat", body))
        if body.get("stream"):
            return gzipped([f"data: {json.dumps(c)}\n\n".encode() for c in sse_chunks(CHAT)] + [b"data: [DONE]\n\n"])
        return JSONResponse(CHAT)

    async def completions(self, request: Request) -> Response:
        body = await request.json()
        self.calls.append(("completions", body))
        if body.get("stream"):
            return gzipped([f"data: {json.dumps(c)}\n\n".encode() for c in sse_chunks(TEXT)] + [b"data: [DONE]\n\n"])
        return JSONResponse(TEXT)

    async def respond(self, request: Request) -> Response:
        body = await request.json()
        self.calls.append(("responses", body))
        if body.get("stream"):
            events = [{"type": "response.created", "sequence_number": 1, "response": {**RESPONSE,
                                                                                       "status": "in_progress"}},
                      {"type": "response.completed", "sequence_number": 2, "response": RESPONSE}]
            return gzipped([f"event: {e['type']}\ndata: {json.dumps(e)}\n\n".encode() for e in events])
        return JSONResponse(RESPONSE)


@pytest.fixture
def relayed():
    upstream = Upstream()
    with serve_app(upstream.app()) as up:
        backend = OpenAIBackend(f"{up}/v1", model="up-model", retry=FAST)
        with serve_app(create_app(ServerSettings(backend=backend, config=SMALL, model_name="rsa"))) as url:
            yield upstream, openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0), url


def test_a_gzipped_upstream_stream_reaches_the_client_decoded(relayed):
    _, client, _ = relayed
    stream = client.chat.completions.create(model="rsa", messages=HELLO, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == "Four, as it happens."


def test_text_completions_pass_through_streamed_or_not(relayed):
    upstream, client, _ = relayed
    assert client.completions.create(model="rsa", prompt="2 + 2 =", max_tokens=3).choices[0].text == " four"
    streamed = client.completions.create(model="rsa", prompt="2 + 2 =", max_tokens=3, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == " four"
    assert [path for path, _ in upstream.calls] == ["completions", "completions"]
    assert upstream.calls[0][1]["model"] == "up-model" and upstream.calls[0][1]["prompt"] == "2 + 2 ="


def test_plain_responses_requests_pass_through_to_an_upstream_that_has_them(relayed):
    upstream, client, _ = relayed
    reply = client.responses.create(model="rsa", input="What is 2 + 2?", max_output_tokens=9)
    assert reply.output_text == "Four." and upstream.calls[-1] == ("responses", {
        "model": "up-model", "input": "What is 2 + 2?", "max_output_tokens": 9})
    events = [e.type for e in client.responses.create(model="rsa", input="What is 2 + 2?", stream=True)]
    assert events == ["response.created", "response.completed"]


def test_responses_without_an_upstream_that_has_them_run_as_one_chat_generation():
    upstream = Upstream(responses=False)
    with serve_app(upstream.app()) as up:
        backend = OpenAIBackend(f"{up}/v1", model="up-model", retry=FAST)
        with serve_app(create_app(ServerSettings(backend=backend, config=SMALL, model_name="rsa"))) as url:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
            reply = client.responses.create(model="rsa", input="What is 2 + 2?", instructions="Be brief.")
    assert reply.output_text == "Four, as it happens."
    assert upstream.calls[-1][0] == "chat" and upstream.calls[-1][1]["messages"][0]["content"] == "Be brief."


def test_rsa_fields_on_text_completions_are_a_400(relayed):
    _, _, url = relayed
    reply = httpx.post(f"{url}/v1/completions", json={"prompt": "x", "extended_compute": True})
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "extended_compute"
