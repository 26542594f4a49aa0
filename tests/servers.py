"""Real HTTP servers on 127.0.0.1 for the tests: llama.cpp's, and a fault-injecting one of our own.

The fault server speaks enough of the OpenAI and vLLM APIs (chat, completions, tokenize,
detokenize with one character per token) to drive full runs, and misbehaves on demand per
request body: a body's first calls can get 429 storms, 5xx, hangs, cut connections, broken JSON
or empty choices before it is answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until_up(url: str, *, timeout: float = 120.0, process: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code < 500:
                return
        time.sleep(0.1)
    raise TimeoutError(f"{url} did not come up in {timeout}s")


@contextlib.contextmanager
def llama_cpp_server(gguf: str, *, n_ctx: int = 4096) -> Iterator[str]:
    """llama-cpp-python's OpenAI-compatible server on a free loopback port; yields its /v1 URL."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "llama_cpp.server", "--model", gguf, "--host", "127.0.0.1", "--port", str(port),
         "--n_ctx", str(n_ctx), "--n_threads", "2"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        wait_until_up(f"http://127.0.0.1:{port}/v1/models", process=process)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()


def llama_server_binary() -> str:
    """llama.cpp's C++ server, built once by tools/build-llama-server.sh (``make test`` runs it first and
    passes the path in MARKOV_RSA_LLAMA_SERVER; a bare pytest run builds it here)."""
    path = os.environ.get("MARKOV_RSA_LLAMA_SERVER")
    if path and os.access(path, os.X_OK):
        return path
    script = Path(__file__).resolve().parent.parent / "tools" / "build-llama-server.sh"
    pip = str(Path(sys.executable).with_name("pip"))
    built = subprocess.run(["bash", str(script)], capture_output=True, text=True, env={**os.environ, "PIP": pip})
    if built.returncode != 0:
        raise RuntimeError(f"could not build llama-server: {built.stderr[-2000:]}")
    return built.stdout.strip().splitlines()[-1]


@contextlib.contextmanager
def llama_server(gguf: str, *, n_ctx: int = 4096, slots: int = 4) -> Iterator[str]:
    """llama.cpp's own server (llama-server) on a free loopback port; yields its /v1 URL."""
    port = free_port()
    process = subprocess.Popen(
        [llama_server_binary(), "-m", gguf, "--host", "127.0.0.1", "--port", str(port), "-c", str(n_ctx * slots),
         "-np", str(slots), "-t", "2", "--no-webui"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        wait_until_up(f"http://127.0.0.1:{port}/v1/models", process=process)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()


@contextlib.contextmanager
def serve_app(app: Any) -> Iterator[str]:
    """Run an ASGI app with uvicorn in a thread on a free loopback port; yields its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="critical", timeout_graceful_shutdown=1, lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline:
            raise TimeoutError("uvicorn did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


Fault = str  # "429", "500", "503", "hang", "cut", "badjson", "nochoices", "401", "404", "400"


@dataclass
class FaultServer:
    """A scripted OpenAI-compatible server. ``faults(body)`` lists what a body's first calls get."""

    faults: Callable[[dict[str, Any]], list[Fault]] = lambda body: []
    delay: float | Callable[[dict[str, Any]], float] = 0.0
    retry_after: float | None = None
    hang: float = 3.0
    tokenizer: bool = True
    reasoning: bool = False
    reply: Callable[[dict[str, Any]], str] | None = None
    calls: Counter[str] = field(default_factory=Counter)
    answered: Counter[str] = field(default_factory=Counter)
    bodies: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0

    def app(self) -> Starlette:
        routes = [
            Route("/v1/chat/completions", self._generate, methods=["POST"]),
            Route("/v1/completions", self._generate, methods=["POST"]),
            Route("/v1/models", self._models, methods=["GET"]),
        ]
        if self.tokenizer:
            routes += [Route("/tokenize", self._tokenize, methods=["POST"]),
                       Route("/detokenize", self._detokenize, methods=["POST"])]
        return Starlette(routes=routes)

    async def _models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": "fault-model", "object": "model"}]})

    async def _tokenize(self, request: Request) -> Response:
        body = await request.json()
        return JSONResponse({"tokens": [ord(c) for c in body["prompt"]], "count": len(body["prompt"])})

    async def _detokenize(self, request: Request) -> Response:
        body = await request.json()
        return JSONResponse({"prompt": "".join(chr(t) for t in body["tokens"])})

    def _text(self, body: dict[str, Any]) -> str:
        if self.reply is not None:
            return self.reply(body)
        seed = body.get("seed", 0)
        return f"Working on it, step {seed}. The answer is \\boxed{{{seed % 3}}}."

    async def _generate(self, request: Request) -> Response:
        body = await request.json()
        self.bodies.append(body)
        self.headers.append(dict(request.headers))
        key = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
        attempt = self.calls[key]
        self.calls[key] += 1
        planned = self.faults(body)
        fault = planned[attempt] if attempt < len(planned) else None
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            delay = self.delay(body) if callable(self.delay) else self.delay
            if delay:
                await asyncio.sleep(delay)
            if fault is not None:
                return await self._fail(fault)
            self.answered[key] += 1
            return JSONResponse(self._completion(body))
        finally:
            self.in_flight -= 1

    async def _fail(self, fault: Fault) -> Response:
        if fault == "hang":
            await asyncio.sleep(self.hang)
            return JSONResponse({"error": {"message": "too late"}}, status_code=500)
        if fault == "cut":
            async def broken() -> Any:
                yield b'{"choices": [{"message": {"content": "par'
                raise ConnectionResetError("cut mid-body")

            return StreamingResponse(broken(), media_type="application/json")
        if fault == "badjson":
            return Response(b'{"choices": [ this is not json', media_type="application/json")
        if fault == "nochoices":
            return JSONResponse({"id": "x", "choices": [], "usage": {}})
        status = int(fault)
        headers = {"Retry-After": str(self.retry_after)} if self.retry_after is not None and status == 429 else {}
        messages = {401: "invalid api key", 404: "The model `nope` does not exist.", 400: "max_tokens is too large"}
        return JSONResponse({"error": {"message": messages.get(status, "overloaded")}}, status_code=status,
                            headers=headers)

    def _completion(self, body: dict[str, Any]) -> dict[str, Any]:
        text = self._text(body)
        max_tokens = int(body.get("max_tokens", 10**9))
        finish = "stop"
        if len(text) > max_tokens:
            text, finish = text[:max_tokens], "length"
        usage = {"prompt_tokens": len(json.dumps(body.get("messages", body.get("prompt")))),
                 "completion_tokens": len(text), "total_tokens": 0}
        if "prompt" in body:
            return {"choices": [{"index": 0, "text": text, "finish_reason": finish}], "usage": usage}
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if self.reasoning:
            message = {"role": "assistant", "content": f"\\boxed{{{body.get('seed', 0) % 3}}}",
                       "reasoning_content": "thinking " * 5}
            usage["completion_tokens_details"] = {"reasoning_tokens": 10}
        return {"choices": [{"index": 0, "message": message, "finish_reason": finish}], "usage": usage}


@dataclass
class VLLMLike:
    """A loopback server that behaves like vLLM where the tests need it to, one character per token.

    - Sampling fields a request leaves out are filled from the model's ``generation_config``, as vLLM
      does (``--generation-config auto``); ``effective`` records what each request ran with.
    - ``reasoning_parser``: ``reasoning_content`` holds what precedes ``</think>`` in the output, and
      an output without ``</think>`` is all reasoning (vLLM's DeepSeek-R1 parser).
    - The chat template is ``<|role|>content`` per message, then ``<|assistant|><think>`` (it opens
      the think block itself); ``continue_final_message`` continues the last assistant message.
    - ``/tokenize`` takes ``prompt`` or ``messages``; ``/v1/completions`` takes text or token ids.
    - A prompt longer than ``max_model_len`` gets vLLM's 400.
    ``output(prompt_text, body)`` gives the full text the model would write after the prompt.
    """

    output: Callable[[str, dict[str, Any]], str]
    generation_config: dict[str, Any] = field(default_factory=lambda: {"temperature": 0.6, "top_p": 0.95,
                                                                       "top_k": 20})
    reasoning_parser: bool = True
    max_model_len: int = 100_000
    bodies: list[dict[str, Any]] = field(default_factory=list)
    effective: list[dict[str, Any]] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)

    def app(self) -> Starlette:
        return Starlette(routes=[
            Route("/v1/chat/completions", self._chat, methods=["POST"]),
            Route("/v1/completions", self._completions, methods=["POST"]),
            Route("/v1/models", self._models, methods=["GET"]),
            Route("/tokenize", self._tokenize, methods=["POST"]),
            Route("/detokenize", self._detokenize, methods=["POST"]),
        ])

    @staticmethod
    def render(messages: list[dict[str, Any]], *, add_generation_prompt: bool = True,
               continue_final: bool = False) -> str:
        text = "".join(f"<|{m['role']}|>{m.get('content') or ''}" for m in messages)
        if continue_final:  # the last (assistant) message stays open
            return text
        return text + "<|assistant|><think>" if add_generation_prompt else text

    async def _models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": "vllm-like", "object": "model"}]})

    async def _tokenize(self, request: Request) -> Response:
        body = await request.json()
        if "messages" in body:
            text = self.render(body["messages"], add_generation_prompt=body.get("add_generation_prompt", True))
        else:
            text = body["prompt"]
        return JSONResponse({"tokens": [ord(c) for c in text], "count": len(text), "max_model_len": self.max_model_len})

    async def _detokenize(self, request: Request) -> Response:
        body = await request.json()
        return JSONResponse({"prompt": "".join(chr(t) for t in body["tokens"])})

    def _sampling(self, body: dict[str, Any]) -> dict[str, Any]:
        return {name: body.get(name, self.generation_config.get(name)) for name in ("temperature", "top_p", "top_k")}

    def _too_long(self, prompt: str, body: dict[str, Any]) -> Response | None:
        wanted = len(prompt) + int(body.get("max_tokens") or 0)
        if wanted <= self.max_model_len:
            return None
        message = (f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                   f"{wanted} tokens ({len(prompt)} in the messages, {body.get('max_tokens')} in the completion). "
                   "Please reduce the length of the messages or completion.")
        return JSONResponse({"object": "error", "message": message, "type": "BadRequestError", "param": None,
                             "code": 400}, status_code=400)

    def _generate(self, prompt: str, body: dict[str, Any]) -> tuple[str, str]:
        self.bodies.append(body)
        self.effective.append(self._sampling(body))
        self.prompts.append(prompt)
        text = self.output(prompt, body)
        max_tokens = int(body.get("max_tokens") or 10**9)
        return (text[:max_tokens], "length") if len(text) > max_tokens else (text, "stop")

    async def _chat(self, request: Request) -> Response:
        body = await request.json()
        prompt = self.render(body["messages"], continue_final=bool(body.get("continue_final_message")))
        if (error := self._too_long(prompt, body)) is not None:
            return error
        text, finish = self._generate(prompt, body)
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if self.reasoning_parser:
            close = text.find("</think>")
            reasoning, content = (text[:close], text[close + len("</think>"):]) if close >= 0 else (text, None)
            message = {"role": "assistant", "content": content, "reasoning_content": reasoning}
        usage = {"prompt_tokens": len(prompt), "completion_tokens": len(text), "total_tokens": len(prompt) + len(text)}
        return JSONResponse({"id": "chatcmpl-x", "object": "chat.completion", "model": body.get("model"),
                             "choices": [{"index": 0, "message": message, "finish_reason": finish}], "usage": usage})

    async def _completions(self, request: Request) -> Response:
        body = await request.json()
        raw = body["prompt"]
        prompt = "".join(chr(t) for t in raw) if isinstance(raw, list) else str(raw)
        if (error := self._too_long(prompt, body)) is not None:
            return error
        text, finish = self._generate(prompt, body)
        usage = {"prompt_tokens": len(prompt), "completion_tokens": len(text), "total_tokens": len(prompt) + len(text)}
        return JSONResponse({"id": "cmpl-x", "object": "text_completion", "model": body.get("model"),
                             "choices": [{"index": 0, "text": text, "finish_reason": finish}], "usage": usage})
