"""Real HTTP servers on 127.0.0.1 for the tests: llama.cpp's own, and loopback ones of our own.

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
import tempfile
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
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until_up(url: str, *, timeout: float = 120.0, process: subprocess.Popen[bytes] | None = None,
                  log: Path | None = None) -> None:
    """Poll ``url`` until it answers; a server process that exits first fails with its last stderr lines."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}{stderr_tail(log)}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code < 500:
                return
        time.sleep(0.1)
    raise TimeoutError(f"{url} did not come up in {timeout}s{stderr_tail(log)}")


def stderr_tail(log: Path | None, lines: int = 20) -> str:
    """The last lines a server wrote to its log file, for an error message ('' without one)."""
    if log is None or not log.is_file():
        return ""
    tail = log.read_text(errors="replace").splitlines()[-lines:]
    return "; its last stderr lines:\n" + "\n".join(tail) if tail else "; it wrote nothing to stderr"


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
    """llama.cpp's own server (llama-server) on a free loopback port; yields its /v1 URL.

    Weight repacking is off: llama.cpp's repacked (AMX/AVX-512) CPU kernels crash on some virtualised
    CPUs, and the tests are about the server's API, not its kernels. A server that dies, before or
    after it came up, fails the test with its last stderr lines."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="llama-server-") as folder:
        log = Path(folder) / "stderr.log"
        with log.open("wb") as sink:
            process = subprocess.Popen(
                [llama_server_binary(), "-m", gguf, "--host", "127.0.0.1", "--port", str(port),
                 "-c", str(n_ctx * slots), "-np", str(slots), "-t", "2", "--no-webui", "--metrics",
                 "--no-repack"],
                stdout=subprocess.DEVNULL, stderr=sink, env={**os.environ, "LLAMA_ARG_REPACK": "0"},
            )
        try:
            wait_until_up(f"http://127.0.0.1:{port}/v1/models", process=process, log=log)
            yield f"http://127.0.0.1:{port}/v1"
            if process.poll() is not None:
                raise RuntimeError(f"llama-server died during the test (exit {process.returncode})"
                                   f"{stderr_tail(log)}")
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


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


def sse_chunks(completion: dict[str, Any], *, piece: int = 8) -> list[dict[str, Any]]:
    """A finished chat or text completion as the chunks a server streams: content (and reasoning) in
    pieces of ``piece`` characters, then the finish reason, then usage."""
    choice = completion["choices"][0]
    chunks: list[dict[str, Any]] = []
    base = {"id": completion.get("id", "x"), "model": completion.get("model"), "created": 0}
    if "text" in choice:
        text = choice["text"]
        for i in range(0, len(text), piece):
            chunks.append({**base, "object": "text_completion",
                           "choices": [{"index": 0, "text": text[i:i + piece], "finish_reason": None}]})
        chunks.append({**base, "object": "text_completion",
                       "choices": [{"index": 0, "text": "", "finish_reason": choice["finish_reason"]}]})
    else:
        message = choice["message"]
        chunks.append({**base, "object": "chat.completion.chunk",
                       "choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]})
        for i, call in enumerate(message.get("tool_calls") or []):
            chunks.append({**base, "object": "chat.completion.chunk",
                           "choices": [{"index": 0, "delta": {"tool_calls": [{"index": i, **call}]},
                                        "finish_reason": None}]})
        for key in ("reasoning_content", "content"):
            text = message.get(key) or ""
            for i in range(0, len(text), piece):
                chunks.append({**base, "object": "chat.completion.chunk",
                               "choices": [{"index": 0, "delta": {key: text[i:i + piece]}, "finish_reason": None}]})
        chunks.append({**base, "object": "chat.completion.chunk",
                       "choices": [{"index": 0, "delta": {}, "finish_reason": choice["finish_reason"]}]})
    chunks.append({**base, "choices": [], "usage": completion.get("usage")})
    return chunks


def sse(chunks: list[dict[str, Any]], *, delay: float = 0.0, done: bool = True) -> StreamingResponse:
    async def body() -> Any:
        for chunk in chunks:
            if delay:
                await asyncio.sleep(delay)
            yield f"data: {json.dumps(chunk)}\n\n".encode()
        if done:
            yield b"data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream")


Fault = str  # "429", "500", "503", "hang", "cut", "badjson", "nochoices", "401", "404", "400", "cutstream"


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
        self.headers.append(dict(request.headers))
        return await self._generate_from(await request.json())

    async def _generate_from(self, body: dict[str, Any]) -> Response:
        self.bodies.append(body)
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
                return await self._fail(fault, streamed=bool(body.get("stream")))
            self.answered[key] += 1
            completion = self._completion(body)
            if body.get("stream"):
                return sse(sse_chunks(completion))
            return JSONResponse(completion)
        finally:
            self.in_flight -= 1

    async def _fail(self, fault: Fault, *, streamed: bool = False) -> Response:
        if fault == "hang":
            await asyncio.sleep(self.hang)
            return JSONResponse({"error": {"message": "too late"}}, status_code=500)
        if fault == "cut" and streamed:
            async def cut_stream() -> Any:
                yield b'data: {"choices": [{"index": 0, "delta": {"content": "par"}, "finish_reason": null}]}\n\n'
                raise ConnectionResetError("cut mid-stream")

            return StreamingResponse(cut_stream(), media_type="text/event-stream")
        if fault == "cut":
            async def broken() -> Any:
                yield b'{"choices": [{"message": {"content": "par'
                raise ConnectionResetError("cut mid-body")

            return StreamingResponse(broken(), media_type="application/json")
        if fault == "badjson" and streamed:
            return Response(b"data: {this is not json\n\n", media_type="text/event-stream")
        if fault == "badjson":
            return Response(b'{"choices": [ this is not json', media_type="application/json")
        if fault == "nochoices" and streamed:  # a stream that ends before the generation finished
            return sse([{"choices": [{"index": 0, "delta": {"content": "half"}, "finish_reason": None}]}], done=False)
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


THINK, END_THINK = 100_000, 100_001


def encode(text: str) -> list[int]:
    """The loopback servers' tokenizer: one character per token, ``<think>`` and ``</think>`` one each."""
    ids: list[int] = []
    i = 0
    while i < len(text):
        if text.startswith("<think>", i):
            ids.append(THINK)
            i += len("<think>")
        elif text.startswith("</think>", i):
            ids.append(END_THINK)
            i += len("</think>")
        else:
            ids.append(ord(text[i]))
            i += 1
    return ids


def decode(ids: list[int]) -> str:
    return "".join("<think>" if t == THINK else "</think>" if t == END_THINK else chr(t) for t in ids)


@dataclass
class VLLMLike:
    """A loopback server that behaves like vLLM where the tests need it to (see ``encode``).

    - Sampling fields a request leaves out are filled from the model's ``generation_config``, as vLLM
      does (``--generation-config auto``); ``effective`` records what each request ran with.
    - ``reasoning_parser``: ``reasoning_content`` holds what precedes ``</think>`` in the output, and
      an output without ``</think>`` is all reasoning (vLLM's DeepSeek-R1 parser).
    - The chat template is ``<|role|>content`` per message, then ``<|assistant|><think>`` (it opens
      the think block itself); ``continue_final_message`` continues the last assistant message.
    - ``/tokenize`` takes ``prompt`` or ``messages``; ``/v1/completions`` takes text or token ids.
    - Streams one token per chunk at ``token_rate`` tokens/s (as fast as it can when None), with the
      generated ids when ``return_token_ids`` is set and usage when ``stream_options`` asks.
    - A prefix cache of 16-token blocks: ``usage.prompt_tokens_details.cached_tokens`` says how much
      of a prompt it already held.
    - A prompt longer than ``max_model_len`` gets vLLM's 400.
    ``output(prompt_text, body)`` gives the full text the model would write after the prompt.
    """

    output: Callable[[str, dict[str, Any]], str]
    generation_config: dict[str, Any] = field(default_factory=lambda: {"temperature": 0.6, "top_p": 0.95,
                                                                       "top_k": 20})
    reasoning_parser: bool = True
    max_model_len: int = 100_000
    token_rate: float | None = None
    bodies: list[dict[str, Any]] = field(default_factory=list)
    effective: list[dict[str, Any]] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)
    requests: Counter[str] = field(default_factory=Counter)
    generated: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    _blocks: set[int] = field(default_factory=set)

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
        self.requests["tokenize"] += 1
        body = await request.json()
        if "messages" in body:
            text = self.render(body["messages"], add_generation_prompt=body.get("add_generation_prompt", True))
        else:
            text = body["prompt"]
        ids = encode(text)
        return JSONResponse({"tokens": ids, "count": len(ids), "max_model_len": self.max_model_len})

    async def _detokenize(self, request: Request) -> Response:
        self.requests["detokenize"] += 1
        body = await request.json()
        return JSONResponse({"prompt": decode(body["tokens"])})

    def _sampling(self, body: dict[str, Any]) -> dict[str, Any]:
        return {name: body.get(name, self.generation_config.get(name)) for name in ("temperature", "top_p", "top_k")}

    def _too_long(self, prompt: list[int], body: dict[str, Any]) -> Response | None:
        wanted = len(prompt) + int(body.get("max_tokens") or 0)
        if wanted <= self.max_model_len:
            return None
        message = (f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                   f"{wanted} tokens ({len(prompt)} in the messages, {body.get('max_tokens')} in the completion). "
                   "Please reduce the length of the messages or completion.")
        return JSONResponse({"object": "error", "message": message, "type": "BadRequestError", "param": None,
                             "code": 400}, status_code=400)

    def _cache(self, prompt: list[int]) -> int:
        """Tokens of ``prompt`` already in the prefix cache (whole 16-token blocks); then cache it all."""
        cached, key = 0, 0
        hit = True
        for start in range(0, len(prompt) - len(prompt) % 16, 16):
            key = hash((key, tuple(prompt[start:start + 16])))
            if hit and key in self._blocks:
                cached += 16
            else:
                hit = False
                self._blocks.add(key)
        return cached

    async def _serve(self, prompt_text: str, body: dict[str, Any], completions: bool) -> Response:
        prompt = encode(prompt_text)
        if (error := self._too_long(prompt, body)) is not None:
            return error
        self.bodies.append(body)
        self.effective.append(self._sampling(body))
        self.prompts.append(prompt_text)
        ids = encode(self.output(prompt_text, body))
        max_tokens = int(body.get("max_tokens") or 10**9)
        finish = "stop"
        if len(ids) > max_tokens:
            ids, finish = ids[:max_tokens], "length"
        cached = self._cache(prompt)
        self.prompt_tokens += len(prompt)
        self.cached_tokens += cached
        usage = {"prompt_tokens": len(prompt), "completion_tokens": len(ids), "total_tokens": len(prompt) + len(ids),
                 "prompt_tokens_details": {"cached_tokens": cached}}
        with_ids = bool(body.get("return_token_ids"))
        split = (ids.index(END_THINK) if END_THINK in ids else len(ids)) if self.reasoning_parser and not completions \
            else None
        if not body.get("stream"):
            self.generated += len(ids)
            choice: dict[str, Any] = {"index": 0, "finish_reason": finish}
            if completions:
                choice["text"] = decode(ids)
            elif split is None:
                choice["message"] = {"role": "assistant", "content": decode(ids)}
            else:
                choice["message"] = {"role": "assistant", "reasoning_content": decode(ids[:split]),
                                     "content": decode(ids[split + 1:]) if split < len(ids) else None}
            if with_ids:
                choice["token_ids"] = ids
            return JSONResponse({"id": "x", "model": body.get("model"), "choices": [choice], "usage": usage})

        async def stream() -> Any:
            for n, token in enumerate(ids):
                if self.token_rate:
                    await asyncio.sleep(1 / self.token_rate)
                self.generated += 1
                piece = decode([token])
                if completions:
                    choice = {"index": 0, "text": piece, "finish_reason": None}
                elif split is not None and n == split:
                    choice = {"index": 0, "delta": {}, "finish_reason": None}  # the parser eats </think>
                else:
                    key = "reasoning_content" if split is not None and n < split else "content"
                    choice = {"index": 0, "delta": {key: piece}, "finish_reason": None}
                if with_ids:
                    choice["token_ids"] = [token]
                yield f"data: {json.dumps({'id': 'x', 'choices': [choice]})}\n\n".encode()
            end = {"index": 0, "finish_reason": finish, **({"text": ""} if completions else {"delta": {}})}
            yield f"data: {json.dumps({'id': 'x', 'choices': [end]})}\n\n".encode()
            if (body.get("stream_options") or {}).get("include_usage"):
                yield f"data: {json.dumps({'id': 'x', 'choices': [], 'usage': usage})}\n\n".encode()
            yield b"data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    async def _chat(self, request: Request) -> Response:
        self.requests["chat"] += 1
        body = await request.json()
        prompt = self.render(body["messages"], continue_final=bool(body.get("continue_final_message")))
        return await self._serve(prompt, body, completions=False)

    async def _completions(self, request: Request) -> Response:
        self.requests["completions"] += 1
        body = await request.json()
        raw = body["prompt"]
        prompt = decode(raw) if isinstance(raw, list) else str(raw)
        return await self._serve(prompt, body, completions=True)


async def replica_cache_hits(affinity: bool, problems: list[str], *, concurrent: bool = True
                             ) -> tuple[float, list[Counter[int]]]:
    """Solve ``problems`` (at once, or one after another) over three VLLMLike replicas; returns the servers'
    prefix-cache hit rate (cached / prompt tokens) and, per problem, how many of its prompts each replica
    served."""
    from markov_rsa import MarkovianRSA, RSAConfig
    from markov_rsa.backends.openai import OpenAIBackend

    servers = [VLLMLike(lambda prompt, body: "r" * 40 + "</think>The answer is \\boxed{7}.") for _ in range(3)]
    with contextlib.ExitStack() as stack:
        urls = [f"{stack.enter_context(serve_app(s.app()))}/v1" for s in servers]
        backend = OpenAIBackend(urls, model="m", affinity=affinity, max_concurrency=64)
        config = RSAConfig(population=8, k=3, rounds=2, budget=200, tail=40, seed=1)
        if concurrent:
            await asyncio.gather(*(MarkovianRSA(backend, config).solve(p) for p in problems))
        else:
            for p in problems:
                await MarkovianRSA(backend, config).solve(p)
        await backend.aclose()
    rate = sum(s.cached_tokens for s in servers) / sum(s.prompt_tokens for s in servers)
    placement = [Counter({i: sum(p in prompt for prompt in s.prompts) for i, s in enumerate(servers)})
                 for p in problems]
    return rate, placement


@dataclass
class AgentUpstream:
    """A loopback model server that behaves like a tool-calling model: given tools and no tool result yet,
    it answers with a call to the first tool (arguments spaced differently from request to request, as
    sampled JSON is); once the conversation holds a tool result, it answers in text. It streams when asked
    and records every body it got. Stands in for vLLM with a tool parser, in what the tests are about."""

    bodies: list[dict[str, Any]] = field(default_factory=list)
    status: int = 200

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/v1/chat/completions", self._chat, methods=["POST"]),
                                 Route("/v1/models", self._models, methods=["GET"])])

    async def _models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": "agent-model", "object": "model"}]})

    async def _chat(self, request: Request) -> Response:
        body = await request.json()
        self.bodies.append(body)
        if self.status != 200:
            return JSONResponse({"error": {"message": f"upstream at http://10.1.2.3:9000 says {self.status}"}},
                                status_code=self.status)
        tools = body.get("tools") or []
        messages = body.get("messages") or []
        seed = int(body.get("seed") or 0)
        message: dict[str, Any]
        if tools and not any(m.get("role") == "tool" for m in messages):
            name = tools[0]["function"]["name"]
            arguments = '{"city": "Paris"}' if seed % 2 else '{ "city":"Paris" }'
            message = {"role": "assistant", "content": None,
                       "tool_calls": [{"id": f"call_{seed}", "type": "function",
                                       "function": {"name": name, "arguments": arguments}}]}
            finish = "tool_calls"
        else:
            result = next((m.get("content") for m in reversed(messages) if m.get("role") == "tool"), None)
            message = {"role": "assistant", "content": f"It is {result} in Paris." if result else "Hello there."}
            finish = "stop"
        completion = {"id": "chatcmpl-up", "object": "chat.completion", "model": body.get("model"),
                      "choices": [{"index": 0, "message": message, "finish_reason": finish}],
                      "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}}
        if body.get("stream"):
            return sse(sse_chunks(completion))
        return JSONResponse(completion)


@dataclass
class QueueingServer:
    """A loopback server that queues as vLLM and llama.cpp do: ``slots`` requests run at once, each for
    ``duration`` seconds (its tokens streamed evenly over that time); the rest wait for a slot and are
    sent nothing at all meanwhile (a stream's headers go out at once, as vLLM's do; no body byte until
    a slot frees). A prompt costs up to ``prefill`` seconds more: the share of its 64-character prefix
    blocks that this server has not seen (its prefix cache). ``/metrics`` reports vLLM's queue gauges
    (``vllm:num_requests_waiting``, ``vllm:num_requests_running``) and ``/props`` its slot count
(llama.cpp's ``total_slots``) when ``metrics`` is set; ``/health``
    answers 200 unless ``frozen`` (then nothing answers, as with a stopped process). It records every
    request's queue wait, start and end (server-side timings) and what it prefilled."""

    slots: int = 1
    duration: float = 0.2
    prefill: float = 0.0
    metrics: bool = True
    frozen: bool = False
    tokens: int = 8
    max_model_len: int | None = None
    served: int = 0
    waiting: int = 0
    running: int = 0
    #: Prompt blocks (64 characters) seen, and those found in the prefix cache.
    prompt_blocks: int = 0
    cache_hits: int = 0
    health_checks: int = 0
    metric_reads: int = 0
    spans: list[tuple[float, float]] = field(default_factory=list)
    waits: list[float] = field(default_factory=list)
    _seen: set[str] = field(default_factory=set)
    _slots: asyncio.Semaphore | None = None

    def app(self) -> Starlette:
        routes = [Route("/v1/chat/completions", self._chat, methods=["POST"]),
                  Route("/v1/models", self._models, methods=["GET"]),
                  Route("/health", self._health, methods=["GET"])]
        if self.metrics:
            routes += [Route("/metrics", self._metrics, methods=["GET"]), Route("/props", self._props, methods=["GET"])]
        return Starlette(routes=routes)

    async def _props(self, request: Request) -> Response:
        await self._freeze()
        return JSONResponse({"total_slots": self.slots})

    async def _freeze(self) -> None:
        while self.frozen:
            await asyncio.sleep(0.05)

    async def _models(self, request: Request) -> Response:
        await self._freeze()
        model: dict[str, Any] = {"id": "queued-model", "object": "model"}
        if self.max_model_len is not None:
            model["max_model_len"] = self.max_model_len
        return JSONResponse({"object": "list", "data": [model]})

    async def _health(self, request: Request) -> Response:
        self.health_checks += 1
        await self._freeze()
        return Response(b"", status_code=200)

    async def _metrics(self, request: Request) -> Response:
        self.metric_reads += 1
        await self._freeze()
        text = (f'vllm:num_requests_running{{model_name="queued-model"}} {self.running}.0\n'
                f'vllm:num_requests_waiting{{model_name="queued-model"}} {self.waiting}.0\n')
        return PlainTextResponse(text)

    async def _chat(self, request: Request) -> Response:
        await self._freeze()
        body = await request.json()
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.slots)
        slots = self._slots
        prompt = json.dumps(body.get("messages"))
        seed = int(body.get("seed") or 0)
        text = f"Step {seed}. The answer is \\boxed{{{seed % 3}}}."
        max_tokens = int(body.get("max_tokens") or self.tokens)
        pieces = [text[i * len(text) // self.tokens:(i + 1) * len(text) // self.tokens] for i in range(self.tokens)]
        finish = "stop" if self.tokens <= max_tokens else "length"
        pieces = pieces[:max_tokens]
        arrived = time.monotonic()

        async def run() -> Any:
            self.waiting += 1
            try:
                await slots.acquire()
            finally:
                self.waiting -= 1
            self.running += 1
            started = time.monotonic()
            self.waits.append(started - arrived)
            try:
                # A prefix cache of 64-character blocks: the prefill costs the uncached share of the prompt.
                blocks = [prompt[:end] for end in range(64, len(prompt) + 1, 64)]
                cached = sum(1 for b in blocks if hashlib.sha1(b.encode()).hexdigest() in self._seen)
                self._seen.update(hashlib.sha1(b.encode()).hexdigest() for b in blocks)
                self.prompt_blocks += len(blocks)
                self.cache_hits += cached
                await asyncio.sleep(self.prefill * (1 - cached / max(1, len(blocks))))
                for piece in pieces:
                    await asyncio.sleep(self.duration / max(1, len(pieces)))
                    chunk = {"choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]}
                    yield f"data: {json.dumps(chunk)}\n\n".encode()
                end = {"choices": [{"index": 0, "delta": {}, "finish_reason": finish}],
                       "usage": {"prompt_tokens": len(json.dumps(body.get("messages"))),
                                 "completion_tokens": len(pieces), "total_tokens": 0}}
                yield f"data: {json.dumps(end)}\n\n".encode()
                yield b"data: [DONE]\n\n"
                self.served += 1
                self.spans.append((started, time.monotonic()))
            finally:
                self.running -= 1
                slots.release()

        return StreamingResponse(run(), media_type="text/event-stream")
