"""Pass-through: a client's plain request (chat, text completions, Responses) sent upstream as it came,
over the remote backend's replicas.

The relay reuses the backend's replica choice and retries (:class:`~markov_rsa.backends.openai.routing.Router`)
and its one mapping of HTTP failures; it returns the upstream's reply for the server to send on. An
upstream 4xx comes back with its status and message only: a client must never learn the upstream's
address or see its raw body. Streams reach the client decoded: an upstream (or a proxy in front of it)
that gzips its SSE would otherwise hand the client compressed bytes without their ``Content-Encoding``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx

from markov_rsa.backends.openai import OpenAIBackend
from markov_rsa.backends.openai.http import Transient, server_message, transient_status, transport_errors
from markov_rsa.backends.replicas import Replica
from markov_rsa.errors import AuthenticationError
from markov_rsa.server.privacy import scrub


@dataclass
class Relayed:
    """An upstream reply to a passed-through request: a JSON body, or a stream of SSE bytes."""

    status: int
    body: Any = None
    chunks: AsyncIterator[bytes] | None = None


async def relay(backend: OpenAIBackend, body: dict[str, Any], path: str = "/chat/completions") -> Relayed:
    """Send a client's request upstream to ``path`` (under the base URL) as it came (only ``model`` is set
    to the served one) and return the reply: its status and JSON body, or for ``stream: true`` its SSE
    bytes, decoded. Transient failures before the reply starts are retried; an upstream that rejects this
    server's key is an :class:`AuthenticationError`."""
    await backend.ready()
    router = backend.router
    body = {**body, "model": backend.model}
    streamed = bool(body.get("stream"))
    timed_out = f"timed out after {backend.timeout:.0f}s"

    async def attempt(replica: Replica) -> Relayed:
        shard = router.clients.client()
        url = replica.url + path
        if not streamed:
            with transport_errors(timed_out):
                response = await shard.client.post(url, json=body)
            return _relayed(replica, response, None)
        stack = contextlib.AsyncExitStack()
        try:
            with transport_errors(timed_out):
                response = await stack.enter_async_context(shard.client.stream("POST", url, json=body))
            if response.status_code != 200:
                await response.aread()
                await stack.aclose()
                return _relayed(replica, response, None)
        except BaseException:
            await stack.aclose()
            raise
        return _relayed(replica, response, stack)

    return await router.retrying(attempt, what=f"{path} (pass-through)")


def _relayed(replica: Replica, response: httpx.Response, stack: contextlib.AsyncExitStack | None) -> Relayed:
    transient_status(response)
    status = response.status_code
    if status in (401, 403):
        raise AuthenticationError(f"{replica.url} rejected this server's API key (HTTP {status})", status)
    if status != 200:
        return Relayed(status, {"error": {"message": scrub(server_message(response)),
                                          "type": "invalid_request_error", "param": None, "code": None}})
    if stack is None:
        try:
            return Relayed(200, response.json())
        except ValueError:
            raise Transient("the server sent a body that is not JSON") from None
    return Relayed(200, None, _chunks(response, stack))


async def _chunks(response: httpx.Response, stack: contextlib.AsyncExitStack) -> AsyncIterator[bytes]:
    """The bytes of a streamed reply, decoded from any Content-Encoding; the upstream connection is
    released however iteration ends."""
    try:
        async for chunk in response.aiter_bytes():
            yield chunk
    finally:
        await asyncio.shield(stack.aclose())
