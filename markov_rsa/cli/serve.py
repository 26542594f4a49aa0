"""``rsa serve``: an OpenAI-compatible endpoint that runs Markovian RSA behind it.

A request without ``extended_compute`` and without ``rsa_*`` fields passes straight through to the
backend. With ``extended_compute: true`` it runs the server's preset; the reference proxy's fields
(``rsa_n``, ``rsa_k``, ``rsa_t``, ``short_resp_len``, ``tail_window_len``, ``rsa_final_n``,
``final_temperature``, ``final_top_p``, ``final_top_k``) set parameters with the same names and
meaning, and an ``rsa`` object may carry our own field names (``population``, ``k``, ``rounds``...).

Streaming sends progress as SSE comment lines (``: rsa {...}``), which every SSE client, the
official OpenAI ones included, skips; then the answer as ordinary chat-completion chunks.
Each request builds its own engine: requests share the backend and nothing else. A client that
disconnects cancels its run, which cancels the run's outstanding backend requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from markov_rsa.backends.base import Backend, GenerationRequest, SamplingParams
from markov_rsa.errors import BackendRequestError, ConfigError, MarkovRSAError
from markov_rsa.rsa.config import RSAConfig
from markov_rsa.rsa.engine import MarkovianRSA
from markov_rsa.rsa.events import Event, RunFinished
from markov_rsa.rsa.result import RSAResult
from markov_rsa.rsa.tails import split_reasoning

#: The reference proxy's request fields and the RSAConfig field each one sets.
PROXY_FIELDS: dict[str, str] = {
    "rsa_n": "population",
    "rsa_k": "k",
    "rsa_t": "rounds",
    "short_resp_len": "budget",
    "tail_window_len": "tail",
    "rsa_final_n": "final_n",
    "final_temperature": "final_temperature",
    "final_top_p": "final_top_p",
    "final_top_k": "final_top_k",
}
SAMPLING_FIELDS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "seed": "seed"}
KNOWN_FIELDS = {
    "model", "messages", "stream", "stream_options", "max_tokens", "max_completion_tokens", "n", "stop", "user",
    "extended_compute", "return_rsa_metadata", "rsa", "presence_penalty", "frequency_penalty", "logit_bias",
    "response_format", "metadata", *PROXY_FIELDS, *SAMPLING_FIELDS,
}


class RequestError(Exception):
    """An invalid request: becomes an OpenAI-style error body naming the parameter."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.param, self.status, self.kind = param, status, kind

    def response(self) -> JSONResponse:
        return error_response(str(self), self.status, param=self.param, kind=self.kind)


def error_response(message: str, status: int, *, param: str | None = None, kind: str = "invalid_request_error",
                   code: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status)


@dataclass(frozen=True)
class ServerSettings:
    """Everything the server is configured with; it holds no state that requests could share."""

    backend: Backend
    #: The settings of extended-compute requests before a request's own fields (its task included).
    config: RSAConfig
    api_key: str | None = None
    model_name: str = "markov-rsa"


@dataclass(frozen=True)
class ParsedRequest:
    messages: tuple[dict[str, str], ...]
    stream: bool
    include_usage: bool
    metadata: bool
    config: RSAConfig | None  # None: pass straight through
    max_tokens: int
    sampling: SamplingParams


def _number(body: dict[str, Any], name: str, kind: type, *, minimum: float | None = None) -> Any:
    value = body.get(name)
    if value is None:
        return None
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) if kind is float else (
        isinstance(value, int) and not isinstance(value, bool))
    if not ok:
        raise RequestError(f"{name} must be {'a number' if kind is float else 'an integer'}, got {value!r}", name)
    if minimum is not None and value < minimum:
        raise RequestError(f"{name} must be at least {minimum}, got {value!r}", name)
    return value


def parse_request(body: Any, settings: ServerSettings) -> ParsedRequest:
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    unknown = sorted(k for k in body if k not in KNOWN_FIELDS)
    if unknown:
        raise RequestError(f"unknown field {unknown[0]!r}", unknown[0])
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list", "messages")
    clean: list[dict[str, str]] = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant", "developer"):
            raise RequestError(f"messages[{i}] needs a role of system, user or assistant", f"messages[{i}].role")
        content = message.get("content")
        if isinstance(content, list):  # content parts: keep the text ones
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        if not isinstance(content, str):
            raise RequestError(f"messages[{i}].content must be a string", f"messages[{i}].content")
        clean.append({"role": message["role"], "content": content})
    if not any(m["role"] == "user" for m in clean):
        raise RequestError("messages must contain a user message", "messages")
    n = _number(body, "n", int, minimum=1)
    if n not in (None, 1):
        raise RequestError("n: only n=1 is supported (use rsa.final='population' for the whole population)", "n")
    for flag in ("stream", "extended_compute", "return_rsa_metadata"):
        if flag in body and not isinstance(body[flag], bool):
            raise RequestError(f"{flag} must be true or false", flag)
    stop = body.get("stop")
    stop_list = isinstance(stop, list) and all(isinstance(s, str) for s in stop)
    if stop is not None and not (isinstance(stop, str) or stop_list):
        raise RequestError("stop must be a string or a list of strings", "stop")
    stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
    temperature = _number(body, "temperature", float, minimum=0)
    top_p = _number(body, "top_p", float)
    top_k = _number(body, "top_k", int, minimum=0)
    seed = _number(body, "seed", int, minimum=0)
    max_tokens = _number(body, "max_completion_tokens", int, minimum=1) or _number(body, "max_tokens", int, minimum=1)
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise RequestError("stream_options must be an object", "stream_options")

    rsa_object = body.get("rsa")
    if rsa_object is not None and not isinstance(rsa_object, dict):
        raise RequestError("rsa must be an object of RSA settings", "rsa")
    proxy = {k: body[k] for k in PROXY_FIELDS if body.get(k) is not None}
    wants_rsa = bool(body.get("extended_compute")) or bool(proxy) or bool(rsa_object)
    config: RSAConfig | None = None
    if wants_rsa:
        changes: dict[str, Any] = {}
        origin: dict[str, str] = {}
        for name, target in SAMPLING_FIELDS.items():
            if body.get(name) is not None:
                changes[target] = body[name]
                origin[target] = name
        if proxy:
            proxy_changes, proxy_origin = _proxy_config(proxy, settings.config, max_tokens)
            changes.update(proxy_changes)
            origin.update(proxy_origin)
        elif max_tokens is not None:
            changes["final_budget"] = max_tokens
            origin["final_budget"] = "max_tokens"
        for name, value in (rsa_object or {}).items():
            changes[name] = value
            origin[name] = f"rsa.{name}"
        try:
            config = RSAConfig.from_dict({**settings.config.to_dict(), **changes})
        except ConfigError as exc:
            param = origin.get(exc.field, exc.field)
            message = str(exc).split(": ", 1)[1] if ": " in str(exc) else str(exc)
            raise RequestError(f"{param}: {message}", param) from None
        except TypeError as exc:
            raise RequestError(f"invalid RSA settings: {exc}", "rsa") from None
    sampling = SamplingParams(
        temperature=1.0 if temperature is None else float(temperature),
        top_p=1.0 if top_p is None else float(top_p),
        top_k=top_k or None,
        seed=seed,
        stop=stops,
    )
    return ParsedRequest(
        messages=tuple(clean),
        stream=bool(body.get("stream")),
        include_usage=bool(stream_options.get("include_usage")),
        metadata=bool(body.get("return_rsa_metadata")),
        config=config,
        max_tokens=max_tokens or settings.config.last_stage_budget,
        sampling=sampling,
    )


#: The reference proxy's final-stage sampling when a request does not set it.
PROXY_FINAL_SAMPLING = {"final_temperature": 0.6, "final_top_p": 0.95, "final_top_k": 40}


def _proxy_config(proxy: dict[str, Any], base: RSAConfig, max_tokens: int | None) -> tuple[dict[str, Any],
                                                                                           dict[str, str]]:
    """What a request using the reference proxy's fields runs, as the proxy runs it: ``rsa_t + 1``
    stages in all, the last issuing ``rsa_final_n`` prompts (default 1; 0 means ``rsa_n``) at the
    final sampling (default 0.6 / 0.95 / 40), with the request's ``max_tokens`` as that stage's
    budget. Returns RSAConfig changes and, per changed field, the request field it came from."""
    changes: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for name in ("rsa_n", "rsa_k", "short_resp_len", "tail_window_len"):
        if name in proxy:
            changes[PROXY_FIELDS[name]] = proxy[name]
            origin[PROXY_FIELDS[name]] = name
    for name, default in PROXY_FINAL_SAMPLING.items():
        changes[name] = proxy.get(name, default)
        origin[name] = name
    population = changes.get("population", base.population)
    stages = proxy.get("rsa_t", base.rounds)
    final_n = proxy.get("rsa_final_n", 1)
    for name, value in (("rsa_t", stages), ("rsa_final_n", final_n)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise RequestError(f"{name} must be a non-negative integer, got {value!r}", name)
    final_n = final_n or population
    if max_tokens is not None:
        changes["final_budget"] = max_tokens
        origin["final_budget"] = "max_tokens"
    if stages == 0:  # one stage, which is the last: final_n rollouts at the final sampling
        changes.update(rounds=0, final="majority", population=final_n, temperature=changes["final_temperature"],
                       top_p=changes["final_top_p"], top_k=changes["final_top_k"])
        origin.update(population="rsa_final_n", rounds="rsa_t")
    else:
        changes.update(rounds=stages - 1, final="aggregate", final_n=final_n)
        origin.update(rounds="rsa_t", final_n="rsa_final_n")
    return changes, origin


def problem_text(messages: tuple[dict[str, str], ...]) -> str:
    """The problem the engine solves: the user's turn, with any earlier conversation as context."""
    if len([m for m in messages if m["role"] != "system"]) == 1:
        system = [m["content"] for m in messages if m["role"] in ("system", "developer")]
        user = next(m["content"] for m in messages if m["role"] == "user")
        return "\n\n".join([*system, user])
    return "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages)


def rsa_metadata(result: RSAResult) -> dict[str, Any]:
    return {
        "config": result.config.to_dict(),
        "seed": result.seed,
        "stop_reason": result.stop_reason,
        "selected": list(result.selected) if result.selected else None,
        "votes": result.votes,
        "tails_approximate": result.tails_approximate,
        "prompts": result.prompts,
        "rounds": [
            {
                "index": r.index, "kind": r.kind, "seconds": round(r.seconds, 3),
                "usage": {"prompt_tokens": r.usage.prompt_tokens, "completion_tokens": r.usage.completion_tokens},
                "candidates": [
                    {"index": c.index, "parents": c.parents, "answer": c.answer, "finish_reason": c.finish_reason,
                     "completion_tokens": c.usage.completion_tokens, "tail_tokens": c.tail_tokens, "error": c.error}
                    for c in r.candidates
                ],
            }
            for r in result.rounds
        ],
    }


def _usage(prompt: int, completion: int, reasoning: int) -> dict[str, Any]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "completion_tokens_details": {"reasoning_tokens": reasoning}}


@dataclass
class _Reply:
    """What a run produced, in chat-completion terms."""

    choices: list[dict[str, Any]]
    usage: dict[str, Any]
    extra: dict[str, Any]


def _message(text: str, reasoning: str | None) -> dict[str, Any]:
    """A chat message; ``reasoning_content`` only when the model reasoned apart from its answer (a model
    without a think block has one trace, which the engine reports as both)."""
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if reasoning and reasoning != text:
        message["reasoning_content"] = reasoning
    return message


def reply_from_result(result: RSAResult, metadata: bool) -> _Reply:
    if result.config.final == "population":
        choices = [
            {"index": i, "message": _message(c.text, c.reasoning),
             "finish_reason": "length" if c.finish_reason == "length" else "stop"}
            for i, c in enumerate(result.population)
        ]
    else:
        chosen = next(
            (c for r in result.rounds for c in r.candidates if result.selected == (c.round, c.index)), None
        )
        finish = "length" if chosen is not None and chosen.finish_reason == "length" else "stop"
        choices = [{"index": 0, "message": _message(result.text, result.reasoning), "finish_reason": finish}]
    usage = _usage(result.usage.prompt_tokens, result.usage.completion_tokens, result.usage.reasoning_tokens)
    return _Reply(choices, usage, {"rsa_metadata": rsa_metadata(result)} if metadata else {})


class ChatHandler:
    """Handles one chat-completions request; a new one per request, so nothing is shared."""

    def __init__(self, settings: ServerSettings, parsed: ParsedRequest) -> None:
        self.settings = settings
        self.parsed = parsed
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def envelope(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.settings.model_name}

    async def passthrough(self) -> _Reply:
        p = self.parsed
        gen = await self.settings.backend.generate(GenerationRequest(p.messages, p.max_tokens, p.sampling))
        split = split_reasoning(gen)
        reasoned = gen.reasoning is not None or "</think>" in gen.text
        text, reasoning = (split.answer, split.reasoning) if reasoned else (gen.text, None)
        choice = {"index": 0, "message": _message(text, reasoning), "finish_reason": gen.finish_reason}
        return _Reply([choice], _usage(gen.prompt_tokens, gen.completion_tokens, gen.reasoning_tokens or 0), {})

    def engine(self) -> MarkovianRSA:
        assert self.parsed.config is not None
        return MarkovianRSA(self.settings.backend, self.parsed.config)

    async def complete(self) -> _Reply:
        if self.parsed.config is None:
            return await self.passthrough()
        result = await self.engine().solve(problem_text(self.parsed.messages))
        return reply_from_result(result, self.parsed.metadata)

    def body(self, reply: _Reply) -> dict[str, Any]:
        return {**self.envelope("chat.completion"), "choices": reply.choices, "usage": reply.usage, **reply.extra}

    async def stream(self) -> AsyncGenerator[str, None]:
        if self.parsed.config is None:
            reply = await self.passthrough()
        else:
            result: RSAResult | None = None
            async with contextlib.aclosing(self.engine().stream(problem_text(self.parsed.messages))) as events:
                async for event in events:
                    yield f": rsa {json.dumps(_progress(event))}\n\n"
                    if isinstance(event, RunFinished):
                        result = event.result
            assert result is not None
            reply = reply_from_result(result, self.parsed.metadata)
        for choice in reply.choices:
            first = {"role": "assistant", "content": ""}
            yield self._chunk([{"index": choice["index"], "delta": first, "finish_reason": None}])
            message = choice["message"]
            if message.get("reasoning_content"):
                delta = {"reasoning_content": message["reasoning_content"]}
                yield self._chunk([{"index": choice["index"], "delta": delta, "finish_reason": None}])
            content = {"content": message["content"]}
            yield self._chunk([{"index": choice["index"], "delta": content, "finish_reason": None}])
            yield self._chunk([{"index": choice["index"], "delta": {}, "finish_reason": choice["finish_reason"]}],
                              **reply.extra)
        if self.parsed.include_usage:
            yield self._chunk([], usage=reply.usage)
        yield "data: [DONE]\n\n"

    def _chunk(self, choices: list[dict[str, Any]], **extra: Any) -> str:
        return f"data: {json.dumps({**self.envelope('chat.completion.chunk'), 'choices': choices, **extra})}\n\n"


def _progress(event: Event) -> dict[str, Any]:
    data = event.to_dict()
    if data.get("type") == "round_finished":
        data = {k: data[k] for k in ("type", "round", "round_kind", "majority", "agreement", "seconds", "failed")}
    return data


async def _unless_disconnected(request: Request, work: Any) -> Any:
    """Run ``work``; if the client goes away first, cancel it (and with it every backend request)."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.2)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
                return None
    finally:
        if not task.done():
            task.cancel()


def _authorised(request: Request, settings: ServerSettings) -> bool:
    if not settings.api_key:
        return True
    header = request.headers.get("authorization", "")
    token = header[7:] if header.lower().startswith("bearer ") else ""
    return hmac.compare_digest(token.encode(), settings.api_key.encode())


def _backend_error(exc: MarkovRSAError) -> JSONResponse:
    status = 400 if isinstance(exc, (BackendRequestError, ConfigError)) else 502
    kind = "upstream_error" if status == 502 else "invalid_request_error"
    return error_response(f"backend: {exc}", status, kind=kind)


def create_app(settings: ServerSettings) -> Starlette:
    """The ASGI app; serve it with any ASGI server (``rsa serve`` uses uvicorn)."""

    async def models(request: Request) -> Response:
        if not _authorised(request, settings):
            return error_response("missing or wrong API key (send Authorization: Bearer KEY)", 401,
                                  kind="authentication_error", code="invalid_api_key")
        return JSONResponse({"object": "list", "data": [
            {"id": settings.model_name, "object": "model", "created": 0, "owned_by": "markov-rsa"}]})

    async def chat(request: Request) -> Response:
        if not _authorised(request, settings):
            return error_response("missing or wrong API key (send Authorization: Bearer KEY)", 401,
                                  kind="authentication_error", code="invalid_api_key")
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError):
            return error_response("the request body is not valid JSON", 400)
        try:
            parsed = parse_request(body, settings)
        except RequestError as exc:
            return exc.response()
        handler = ChatHandler(settings, parsed)
        if parsed.stream:
            return StreamingResponse(_guarded_stream(handler), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        try:
            reply = await _unless_disconnected(request, handler.complete())
        except MarkovRSAError as exc:
            return _backend_error(exc)
        if reply is None:
            return Response(status_code=499)
        return JSONResponse(handler.body(reply))

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    return Starlette(routes=[
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
    ])


async def _guarded_stream(handler: ChatHandler) -> AsyncIterator[str]:
    """Errors after the stream started become an OpenAI-style error event, not a cut connection."""
    try:
        async for piece in handler.stream():
            yield piece
    except MarkovRSAError as exc:
        yield f"data: {json.dumps({'error': {'message': f'backend: {exc}', 'type': 'upstream_error'}})}\n\n"
