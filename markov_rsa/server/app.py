"""The OpenAI-compatible app: pass-through, Markovian RSA on request, health and metrics.

A request without RSA fields goes upstream as it came and its reply comes back unchanged (status
codes too), streamed or not; only the upstream's address and internals are kept from the client.
RSA requests (:mod:`~markov_rsa.server.requests`, :mod:`~markov_rsa.server.proxy`) run the engine,
over chat completions or the Responses API (:mod:`~markov_rsa.server.responses`); with
``stream: true`` progress arrives as SSE comment lines (``: rsa {...}``), which stock clients skip,
then the answer or the chosen tool calls as standard chunks or events. A run that is silent for
``heartbeat`` seconds keeps its connection alive (SSE comments; newlines before a JSON reply).

Safe by default: without a token the server takes only ``application/json`` bodies and requests
whose ``Host`` is a loopback name (no cross-site posts, no DNS rebinding); bodies, populations,
rounds, budgets, retries, upstream requests and bytes per run, and concurrent runs (streamed or not)
are capped (:class:`ServerLimits`); a client that disconnects cancels its run, and its upstream
connections are released. Upstream addresses, credentials and raw upstream error text never reach a
client (:mod:`~markov_rsa.server.privacy`); upstream 404s and persistent 429s keep their status.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any, Protocol

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from markov_rsa.backends.base import Generation
from markov_rsa.backends.openai import OpenAIBackend
from markov_rsa.errors import (
    AuthenticationError,
    BackendRequestError,
    ConfigError,
    MarkovRSAError,
    ModelNotFoundError,
)
from markov_rsa.rsa.engine import MarkovianRSA
from markov_rsa.rsa.events import RunFinished
from markov_rsa.rsa.result import RSAResult
from markov_rsa.rsa.tails import split_reasoning
from markov_rsa.server.errors import RequestError
from markov_rsa.server.metrics import Metrics
from markov_rsa.server.privacy import scrub, upstream_status
from markov_rsa.server.proxy import PROXY_NAMES
from markov_rsa.server.relay import Relayed, relay
from markov_rsa.server.replies import Reply, message, progress_comment, reply_chunks, reply_from_result, usage_body
from markov_rsa.server.requests import ParsedRequest, finite_float, parse_request, plain_request, reject_constant
from markov_rsa.server.responses import ResponsesShape, chat_body
from markov_rsa.server.settings import ServerSettings

logger = logging.getLogger("markov_rsa.server")

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]", "::1")


def error_response(message_text: str, status: int, *, param: str | None = None,
                   kind: str = "invalid_request_error", code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message_text, "type": kind, "param": param, "code": code}},
                        status_code=status, headers=headers)


def _host_name(header: str) -> str:
    """The host of a ``Host`` header, lower-cased; empty where the header is not a host and optional port
    (``[::1]evil.com`` is no loopback name)."""
    header = header.strip().lower()
    if header.startswith("["):
        end = header.find("]")
        rest = header[end + 1:] if end > 0 else "x"
        return header[: end + 1] if not rest or (rest[0] == ":" and rest[1:].isdigit()) else ""
    if header.count(":") == 1:
        name, port = header.split(":")
        return name if port.isdigit() else ""
    return header


class _Server:
    """The app's state: settings, counters and the in-flight run count (one per app)."""

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.metrics = Metrics()

    # -- guards ---------------------------------------------------------------------------------
    def guard(self, request: Request, *, post: bool) -> Response | None:
        settings = self.settings
        if not settings.api_key:
            host = _host_name(request.headers.get("host", ""))
            if host not in LOOPBACK_HOSTS and host not in settings.allowed_hosts:
                return error_response("this server answers only requests addressed to a loopback name (set a "
                                      "token with --api-key-env to serve others)", 403, kind="forbidden")
            kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
            if post and kind != "application/json":
                return error_response("send the body as application/json", 415)
            return None
        header = request.headers.get("authorization", "")
        token = header[7:] if header.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(token.encode(), settings.api_key.encode()):
            return error_response("missing or wrong API key (send Authorization: Bearer KEY)", 401,
                                  kind="authentication_error", code="invalid_api_key")
        return None

    async def body(self, request: Request) -> Any:
        limits = self.settings.limits
        limit = limits.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            raise RequestError(f"the request body is larger than {limit} bytes", status=413)
        data = bytearray()

        async def read() -> None:
            async for piece in request.stream():
                data.extend(piece)
                if len(data) > limit:
                    raise RequestError(f"the request body is larger than {limit} bytes", status=413)

        try:
            await asyncio.wait_for(read(), limits.body_seconds)
        except asyncio.TimeoutError:
            raise RequestError(f"the request body took longer than {limits.body_seconds:.0f}s to arrive",
                               status=408) from None
        try:
            return json.loads(bytes(data), parse_constant=reject_constant, parse_float=finite_float)
        except RecursionError:
            raise RequestError("the request body is nested too deeply") from None
        except (ValueError, UnicodeDecodeError):
            raise RequestError("the request body is not valid JSON") from None

    # -- errors ---------------------------------------------------------------------------------
    def backend_error(self, exc: MarkovRSAError) -> JSONResponse:
        """A backend failure as a client may see it: their own mistakes with the upstream's status and a
        scrubbed message, upstream trouble generic (a missing model stays a 404, a persistent 429 a 429
        with Retry-After, so SDKs neither retry the first nor miss the second)."""
        if isinstance(exc, ConfigError):
            return error_response(str(exc), 400, param=exc.field)
        self.metrics.upstream_errors_total += 1
        if isinstance(exc, AuthenticationError):
            logger.error("the upstream server rejected this server's credentials: %s", exc)
            return error_response("the upstream model server refused this server's credentials; the operator "
                                  "has the details", 502, kind="upstream_error")
        if isinstance(exc, ModelNotFoundError):
            logger.error("the upstream has no such model or route: %s", exc)
            return error_response("the upstream model server does not serve this model or route; the operator "
                                  "has the details", 404, kind="not_found_error", code="model_not_found")
        code = exc.status_code if isinstance(exc, BackendRequestError) else upstream_status(str(exc))
        if code is not None and 400 <= code < 500 and isinstance(exc, BackendRequestError):
            logger.info("upstream refused a request: %s", exc)  # the client's to fix: its status and message
            return error_response(scrub(str(exc).split("): ", 1)[-1]), code)
        if code == 429:
            logger.warning("upstream rate limit persisted through the retries: %s", exc)
            retry = str(self.settings.limits.retry_after)
            return error_response("the upstream model server is rate limiting; retry shortly", 429,
                                  kind="rate_limit_error", headers={"Retry-After": retry})
        logger.warning("upstream failure: %s", exc)
        return error_response("the upstream model server is unavailable; try again later", 502,
                              kind="upstream_error")

    # -- pass-through ---------------------------------------------------------------------------
    async def passthrough(self, parsed: ParsedRequest) -> Response:
        self.metrics.passthrough_total += 1
        backend = self.settings.backend
        if not isinstance(backend, OpenAIBackend):
            return await self._local_passthrough(parsed)
        return await self.relayed(backend, parsed.body, "/chat/completions")

    async def relayed(self, backend: OpenAIBackend, body: dict[str, Any], path: str,
                      relayed: Relayed | None = None) -> Response:
        """The upstream's reply to ``body`` at ``path``, as the client gets it."""
        try:
            relayed = relayed or await relay(backend, body, path)
        except MarkovRSAError as exc:
            return self.backend_error(exc)
        if relayed.chunks is None:
            return JSONResponse(relayed.body, status_code=relayed.status)
        return StreamingResponse(_released(relayed.chunks), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    async def completions(self, body: Any) -> Response:
        """Text completions pass through; RSA runs take chat or Responses requests."""
        if not isinstance(body, dict):
            return error_response("the request body must be a JSON object", 400)
        for name in ("extended_compute", "rsa", *PROXY_NAMES):
            if name in body:
                return error_response(f"{name}: RSA runs take /v1/chat/completions or /v1/responses requests; "
                                      "/v1/completions passes through only", 400, param=name)
        backend = self.settings.backend
        if not isinstance(backend, OpenAIBackend):
            return error_response("this server has no upstream for text completions; use /v1/chat/completions",
                                  404, kind="not_found_error")
        self.metrics.passthrough_total += 1
        return await self.relayed(backend, body, "/completions")

    async def _plain_generation(self, parsed: ParsedRequest) -> tuple[Generation, str, str | None] | Response:
        """One generation from the request's fields with its answer text and reasoning, or the error reply."""
        try:
            gen = await self.settings.backend.generate(plain_request(parsed.body, self.settings))
        except RequestError as exc:
            return error_response(str(exc), exc.status, param=exc.param)
        except MarkovRSAError as exc:
            return self.backend_error(exc)
        split = split_reasoning(gen)
        reasoned = gen.reasoning is not None or "</think>" in gen.text
        text, reasoning = (split.answer, split.reasoning) if reasoned else (gen.text, None)
        return gen, text, reasoning

    async def _local_passthrough(self, parsed: ParsedRequest) -> Response:
        """A backend without an upstream (the local model): one generation from the request's fields."""
        outcome = await self._plain_generation(parsed)
        if isinstance(outcome, Response):
            return outcome
        gen, text, reasoning = outcome
        reply = Reply([{"index": 0, "message": message(text, reasoning), "finish_reason": gen.finish_reason}],
                      usage_body(gen.prompt_tokens, gen.completion_tokens, gen.reasoning_tokens or 0), {})
        handler = _Envelope(self.settings.model_name)
        if parsed.stream:
            return StreamingResponse(_iterate(reply_chunks(reply, handler.envelope("chat.completion.chunk"),
                                                           parsed.include_usage)), media_type="text/event-stream")
        return JSONResponse({**handler.envelope("chat.completion"), "choices": reply.choices, "usage": reply.usage})

    async def responses_passthrough(self, raw: dict[str, Any], parsed: ParsedRequest, shape: Shape) -> Response:
        """A Responses request without RSA: relayed to an upstream that serves the Responses API; where
        the upstream has none (or there is no upstream), one chat generation written as a Response."""
        self.metrics.passthrough_total += 1
        backend = self.settings.backend
        if isinstance(backend, OpenAIBackend):
            try:
                relayed = await relay(backend, raw, "/responses")
            except MarkovRSAError as exc:
                return self.backend_error(exc)
            if relayed.status != 404:
                return await self.relayed(backend, raw, "/responses", relayed)
            logger.info("the upstream has no Responses API; running the request as one chat generation")
        outcome = await self._plain_generation(parsed)
        if isinstance(outcome, Response):
            return outcome
        gen, text, reasoning = outcome
        calls = [dict(c) for c in gen.tool_calls] if gen.tool_calls else None
        reply = Reply([{"index": 0, "message": message(text, reasoning, calls), "finish_reason": gen.finish_reason}],
                      usage_body(gen.prompt_tokens, gen.completion_tokens, gen.reasoning_tokens or 0), {})
        if parsed.stream:
            return StreamingResponse(_iterate(shape.chunks(reply, False)), media_type="text/event-stream")
        return JSONResponse(shape.body(reply))

    # -- RSA ------------------------------------------------------------------------------------
    def engine(self, parsed: ParsedRequest) -> MarkovianRSA:
        assert parsed.config is not None
        return MarkovianRSA(self.settings.backend, parsed.config)

    def events(self, parsed: ParsedRequest) -> Any:
        return self.engine(parsed).stream(parsed.problem, context=parsed.context, trailing=parsed.trailing,
                                          tools=parsed.tools, tool_choice=parsed.tool_choice, extra=parsed.extra)

    def account(self, result: RSAResult) -> None:
        self.metrics.generations_total += result.usage.requests
        self.metrics.completion_tokens_total += result.usage.generated_tokens
        self.metrics.prompt_tokens_total += result.usage.prompt_tokens

    async def rsa(self, request: Request, parsed: ParsedRequest, shape: Shape | None = None) -> Response:
        """Run RSA. The run holds one of ``max_concurrent_runs`` slots from admission to its last byte,
        streamed or not. A non-streamed run that outlasts ``heartbeat`` seconds commits to HTTP 200 and
        sends a newline every ``heartbeat`` seconds (JSON allows leading whitespace), so no client times
        out and retries a run that is still working; an error after that point is an OpenAI error body."""
        limits = self.settings.limits
        if self.metrics.runs_in_flight >= limits.max_concurrent_runs:
            self.metrics.runs_rejected_total += 1
            return error_response(f"the server is running {limits.max_concurrent_runs} RSA runs; retry shortly", 429,
                                  kind="rate_limit_error", headers={"Retry-After": str(limits.retry_after)})
        self.metrics.runs_total += 1
        slot = _RunSlot(self.metrics)
        shape = shape or _ChatShape(self.settings.model_name)
        if parsed.stream:
            return _HeldResponse(slot, self._stream(parsed, shape), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
        task = asyncio.create_task(self._solve(parsed))
        try:
            settled = await _settle(request, task, self.settings.heartbeat)
        except BaseException:
            task.cancel()
            slot.release()
            raise
        if settled is None:
            slot.release()
            self.metrics.client_disconnects_total += 1
            return Response(status_code=499)
        if settled:
            slot.release()
            try:
                result = task.result()
            except MarkovRSAError as exc:
                return self.backend_error(exc)
            return JSONResponse(shape.body(reply_from_result(result, parsed.metadata, parsed.all_final)))
        return _HeldResponse(slot, self._json_when_done(task, parsed, shape), media_type="application/json")

    async def _json_when_done(self, task: asyncio.Task[RSAResult], parsed: ParsedRequest,
                              shape: Shape) -> AsyncIterator[str]:
        """Newlines until the run ends, then its reply (or an error body); leaving cancels the run."""
        finished = False
        try:
            yield "\n"
            while not (await asyncio.wait({task}, timeout=self.settings.heartbeat))[0]:
                yield "\n"
            try:
                body = json.dumps(shape.body(reply_from_result(task.result(), parsed.metadata, parsed.all_final)))
            except MarkovRSAError as exc:
                body = bytes(self.backend_error(exc).body).decode()
            except Exception:
                logger.exception("an RSA run failed after its reply had started")
                body = bytes(error_response("the run failed; the operator has the details", 500,
                                            kind="server_error").body).decode()
            finished = True
            yield body
        finally:
            if not finished:
                self.metrics.client_disconnects_total += 1
                task.cancel()

    async def _solve(self, parsed: ParsedRequest) -> RSAResult:
        async with contextlib.aclosing(self.events(parsed)) as events:
            async for event in events:
                if isinstance(event, RunFinished):
                    self.account(event.result)
                    return event.result
        raise RuntimeError("run ended without a result")  # pragma: no cover

    async def _stream(self, parsed: ParsedRequest, shape: Shape) -> AsyncIterator[str]:
        """Progress comments, then the reply. Runs the engine in a task of its own, so a disconnect (which
        cancels this generator, possibly again and again) cancels the run exactly once and the run's
        cleanup (its upstream connections) completes undisturbed. While nothing happens (a silent
        upstream), an SSE comment every ``heartbeat`` seconds keeps the connection alive."""
        queue: asyncio.Queue[Any] = asyncio.Queue()

        async def produce() -> None:
            try:
                async with contextlib.aclosing(self.events(parsed)) as events:
                    async for event in events:
                        await queue.put(event)
            except BaseException as exc:
                await queue.put(exc)
                return
            await queue.put(None)

        task = asyncio.create_task(produce())
        finished = False
        try:
            while True:
                try:
                    item = await asyncio.wait_for(queue.get(), self.settings.heartbeat)
                except asyncio.TimeoutError:
                    yield ": keep-alive\n\n"
                    continue
                if item is None:
                    break
                if isinstance(item, BaseException):
                    raise item
                yield progress_comment(item)
                if isinstance(item, RunFinished):
                    self.account(item.result)
                    reply = reply_from_result(item.result, parsed.metadata, parsed.all_final)
                    for piece in shape.chunks(reply, parsed.include_usage):
                        yield piece
            finished = True
        except MarkovRSAError as exc:
            yield shape.error_chunk(json.loads(bytes(self.backend_error(exc).body)))
            finished = True
        finally:
            if not finished:
                self.metrics.client_disconnects_total += 1
                task.cancel()


class Shape(Protocol):
    """How a run's reply is written: a chat completion, or a Response (:mod:`~markov_rsa.server.responses`)."""

    def body(self, reply: Reply) -> dict[str, Any]: ...

    def chunks(self, reply: Reply, include_usage: bool) -> Iterator[str]: ...

    def error_chunk(self, error: dict[str, Any]) -> str: ...


class _ChatShape:
    def __init__(self, model: str) -> None:
        self.envelope = _Envelope(model)

    def body(self, reply: Reply) -> dict[str, Any]:
        return {**self.envelope.envelope("chat.completion"), "choices": reply.choices, "usage": reply.usage,
                **reply.extra}

    def chunks(self, reply: Reply, include_usage: bool) -> Iterator[str]:
        return reply_chunks(reply, self.envelope.envelope("chat.completion.chunk"), include_usage)

    def error_chunk(self, error: dict[str, Any]) -> str:
        return f"data: {json.dumps(error)}\n\n"


class _Envelope:
    def __init__(self, model: str) -> None:
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model

    def envelope(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}


async def _iterate(pieces: Any) -> AsyncIterator[str]:
    for piece in pieces:
        yield piece


async def _released(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """Relay upstream bytes; however the client leaves, the upstream stream is closed (once, shielded)."""
    try:
        async for chunk in chunks:
            yield chunk
    finally:
        aclose = getattr(chunks, "aclose", None)
        if aclose is not None:
            await asyncio.shield(aclose())


async def _settle(request: Request, task: asyncio.Task[Any], wait: float) -> bool | None:
    """Wait up to ``wait`` seconds for ``task``: True when it is done, False when it is still running,
    None when the client went away first (the task is then cancelled)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    while True:
        remaining = deadline - loop.time()
        if remaining <= 0:
            return False
        done, _ = await asyncio.wait({task}, timeout=min(0.25, remaining))
        if done:
            return True
        if await request.is_disconnected():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
            return None


class _RunSlot:
    """One of ``max_concurrent_runs``, taken at admission and given back exactly once."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self._held = True
        metrics.runs_in_flight += 1

    def release(self) -> None:
        if self._held:
            self._held = False
            self._metrics.runs_in_flight -= 1


class _HeldResponse(StreamingResponse):
    """A streamed reply that gives its run's slot back however it ends, even if its body never starts
    (a client that leaves before the first byte)."""

    def __init__(self, slot: _RunSlot, content: AsyncIterator[str], **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self.slot = slot

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.slot.release()


def create_app(settings: ServerSettings) -> Starlette:
    """The ASGI app; serve it with any ASGI server (``rsa serve`` uses uvicorn)."""
    server = _Server(settings)

    async def models(request: Request) -> Response:
        if (refused := server.guard(request, post=False)) is not None:
            return refused
        return JSONResponse({"object": "list", "data": [
            {"id": settings.model_name, "object": "model", "created": 0, "owned_by": "markov-rsa"}]})

    async def model(request: Request) -> Response:
        if (refused := server.guard(request, post=False)) is not None:
            return refused
        name = request.path_params["name"]
        if name != settings.model_name:
            return error_response(f"the model {name!r} does not exist on this server (it serves "
                                  f"{settings.model_name!r})", 404, param="model", kind="not_found_error",
                                  code="model_not_found")
        return JSONResponse({"id": name, "object": "model", "created": 0, "owned_by": "markov-rsa"})

    async def chat(request: Request) -> Response:
        if (refused := server.guard(request, post=True)) is not None:
            return refused
        try:
            parsed = parse_request(await server.body(request), settings)
        except RequestError as exc:
            return error_response(str(exc), exc.status, param=exc.param, kind=exc.kind)
        if parsed.config is None:
            return await server.passthrough(parsed)
        return await server.rsa(request, parsed)

    async def responses(request: Request) -> Response:
        if (refused := server.guard(request, post=True)) is not None:
            return refused
        try:
            raw = await server.body(request)
            parsed = parse_request(chat_body(raw), settings)
        except RequestError as exc:
            return error_response(str(exc), exc.status, param=exc.param, kind=exc.kind)
        shape = ResponsesShape(raw, settings.model_name)
        if parsed.config is None:
            return await server.responses_passthrough(raw, parsed, shape)
        return await server.rsa(request, parsed, shape)

    async def completions(request: Request) -> Response:
        if (refused := server.guard(request, post=True)) is not None:
            return refused
        try:
            body = await server.body(request)
        except RequestError as exc:
            return error_response(str(exc), exc.status, param=exc.param, kind=exc.kind)
        return await server.completions(body)

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "runs_in_flight": server.metrics.runs_in_flight})

    async def metrics(request: Request) -> Response:
        if (refused := server.guard(request, post=False)) is not None:
            return refused
        stats = getattr(settings.backend, "stats", None) or {}
        backend = {name: stats.get(name, 0) for name in ("requests", "retries", "errors")}
        return PlainTextResponse(server.metrics.render(backend),
                                 media_type="text/plain; version=0.0.4")

    async def not_found(request: Request, exc: Exception) -> Response:
        return error_response(f"no route {request.method} {request.url.path} on this server", 404,
                              kind="not_found_error")

    async def wrong_method(request: Request, exc: Exception) -> Response:
        return error_response(f"{request.url.path} does not take {request.method}", 405,
                              kind="invalid_request_error")

    app = Starlette(exception_handlers={404: not_found, 405: wrong_method}, routes=[
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Route("/v1/responses", responses, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/models/{name:path}", model, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ])
    app.state.server = server
    return app
