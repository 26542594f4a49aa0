"""One generation request on one replica: streamed (SSE) and read as it arrives, or one JSON reply.

A rollout that thinks for twenty minutes is never cut off: the timeout bounds the connect and the
longest silence between chunks, and an optional deadline bounds the whole request. Whatever goes
wrong mid-way is a :class:`Transient` that carries the tokens already streamed (paid for, thrown away).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx

from markov_rsa.backends.base import Generation, GenerationRequest
from markov_rsa.backends.openai.http import Transient, raise_for_status, transport_errors
from markov_rsa.backends.openai.routing import Router
from markov_rsa.backends.replicas import Replica
from markov_rsa.backends.sse import MalformedReply, StreamReader

logger = logging.getLogger("markov_rsa.backends.openai.stream")


@dataclass
class _Progress:
    """When the stream's first body byte and latest line came (monotonic seconds)."""

    started: float
    last: float
    first: float | None = None
    checked: float = 0.0


async def stream_once(router: Router, replica: Replica, path: str, body: dict[str, Any], request: GenerationRequest,
                      completions: bool, start: float) -> Generation:
    """Stream one generation from ``replica``, reporting progress as tokens arrive.

    Three bounds, kept apart: the connect (``timeouts.connect``); the wait for the first byte of the
    body, which is a queue for a free slot or a long prefill on a busy server, so it is unbounded
    (or ``timeouts.first_byte``) while the server answers its health check every ``silence``
    seconds; and the silence between chunks once the stream has started (``timeouts.silence``).
    """
    reader = StreamReader(completions=completions)
    silence = router.timeouts.silence
    now = time.monotonic()
    progress = _Progress(started=now, last=now, checked=now)
    reading = asyncio.ensure_future(_read(router, replica, path, body, request, reader, progress))
    poll = min(1.0, silence / 4)
    try:
        while not reading.done():
            await asyncio.wait({reading}, timeout=poll)
            if reading.done():
                break
            now = time.monotonic()
            if progress.first is None:
                limit = router.timeouts.first_byte
                if limit is not None and now - progress.started > limit:
                    raise Transient(f"no reply within {limit:.0f}s", spent=reader.tokens_so_far, timed_out=True)
                if now - progress.checked >= silence:
                    if not await alive(router, replica):
                        raise Transient(f"no reply in {now - progress.started:.0f}s and the server does not answer "
                                        "its health check", spent=reader.tokens_so_far, timed_out=True)
                    progress.checked = time.monotonic()
                    logger.debug("%s has not started a reply after %.0fs but is alive: queued, waiting on",
                                 replica.url, now - progress.started)
            elif now - progress.last > silence:
                raise Transient(f"no data for {silence:.0f}s", spent=reader.tokens_so_far, timed_out=True)
        reading.result()
    except Transient as exc:
        if exc.timed_out:
            logger.warning("stream from %s: %s (--timeout); retrying", replica.url, exc)
        raise
    except MalformedReply as exc:
        raise Transient(str(exc), spent=reader.tokens_so_far) from None
    finally:
        if not reading.done():
            reading.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reading
        elif not reading.cancelled():
            reading.exception()  # read by whoever cancelled us, or already raised above: never "unretrieved"
    try:
        return reader.result(time.perf_counter() - start)
    except MalformedReply as exc:
        raise Transient(str(exc), spent=reader.tokens_so_far) from None


async def alive(router: Router, replica: Replica) -> bool:
    """Whether the server answers its health check (``/health``) within the silence bound: a server
    that does is busy, not gone. Any status below 500 counts (a server without /health answers 404)."""
    try:
        response = await router.clients.client().client.get(replica.root + "/health",
                                                             timeout=router.timeouts.silence)
    except httpx.HTTPError:
        return False
    return response.status_code < 500


async def _read(router: Router, replica: Replica, path: str, body: dict[str, Any], request: GenerationRequest,
                reader: StreamReader, progress: _Progress) -> None:
    url = replica.url + path
    shard = router.clients.client()
    shard.in_flight += 1
    silence = router.timeouts.silence
    # No read timeout here: the watchdog in stream_once tells a queue from a dead server.
    timeout = httpx.Timeout(silence, connect=router.timeouts.connect, read=None, pool=None)
    try:
        with transport_errors(f"no data for {silence:.0f}s", spent=lambda: reader.tokens_so_far):
            async with contextlib.AsyncExitStack() as stack:
                response = await stack.enter_async_context(
                    shard.client.stream("POST", url, json=body, timeout=timeout))
                if response.status_code != 200:
                    await response.aread()
                    raise_for_status(replica.url, path, response, router.model)
                async for line in _lines(response, router.timeouts.deadline):
                    now = time.monotonic()
                    if progress.first is None:
                        progress.first = now
                    elif now - progress.last > max(30.0, silence / 4):
                        logger.info("stream from %s resumed after %.0fs of silence", replica.url, now - progress.last)
                    progress.last = now
                    if reader.feed_line(line) and request.on_progress is not None:
                        request.on_progress(reader.tokens_so_far)
                    if reader.done:
                        break
    finally:
        shard.in_flight -= 1


async def _lines(response: httpx.Response, deadline: float | None) -> AsyncIterator[str]:
    if deadline is None:
        async for line in response.aiter_lines():
            yield line
        return
    ends = time.monotonic() + deadline
    lines = response.aiter_lines()
    while True:
        try:
            line = await asyncio.wait_for(lines.__anext__(), max(0.0, ends - time.monotonic()))
        except StopAsyncIteration:
            return
        except asyncio.TimeoutError:
            raise Transient(f"the request ran past its {deadline:.0f}s deadline") from None
        yield line


def parse_reply(data: Any, latency: float, *, completions: bool = False) -> Generation:
    """A non-streamed completion (for servers that cannot stream)."""
    choices = data.get("choices") if isinstance(data, dict) else None
    if not choices or not isinstance(choices, list) or not isinstance(choices[0], dict):
        raise Transient("the server returned no choices")
    choice = dict(choices[0])
    reader = StreamReader(completions=completions)
    if not completions:
        message = choice.pop("message", None) or {}
        if not isinstance(message, dict):
            raise Transient("the server returned a message that is not an object")
        choice["delta"] = message
    reader.feed_line("data: " + json.dumps({"choices": [choice], "usage": data.get("usage")}))
    if reader.finish_reason is None:
        reader.finish_reason = "stop"
    try:
        return reader.result(latency)
    except MalformedReply as exc:
        raise Transient(str(exc)) from None
