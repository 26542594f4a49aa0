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
from typing import Any

import httpx

from markov_rsa.backends.base import Generation, GenerationRequest
from markov_rsa.backends.openai.http import Transient, raise_for_status, transport_errors
from markov_rsa.backends.openai.routing import Router
from markov_rsa.backends.replicas import Replica
from markov_rsa.backends.sse import MalformedReply, StreamReader

logger = logging.getLogger("markov_rsa.backends.openai.stream")


async def stream_once(router: Router, replica: Replica, path: str, body: dict[str, Any], request: GenerationRequest,
                      completions: bool, start: float) -> Generation:
    """Stream one generation from ``replica``, reporting progress as tokens arrive."""
    url = replica.url + path
    shard = router.clients.client()
    shard.in_flight += 1
    reader = StreamReader(completions=completions)
    silence = router.timeouts.silence
    try:
        with transport_errors(f"no data for {silence:.0f}s", spent=lambda: reader.tokens_so_far):
            async with contextlib.AsyncExitStack() as stack:
                response = await stack.enter_async_context(shard.client.stream("POST", url, json=body))
                if response.status_code != 200:
                    await response.aread()
                    raise_for_status(replica.url, path, response, router.model)
                last = time.monotonic()
                async for line in _lines(response, router.timeouts.deadline):
                    now = time.monotonic()
                    if now - last > max(30.0, silence / 4):
                        logger.info("stream from %s resumed after %.0fs of silence", replica.url, now - last)
                    last = now
                    if reader.feed_line(line) and request.on_progress is not None:
                        request.on_progress(reader.tokens_so_far)
                    if reader.done:
                        break
    except Transient as exc:
        if exc.timed_out:
            logger.warning("stream from %s was silent for %.0fs (--timeout); retrying", replica.url, silence)
        raise
    except MalformedReply as exc:
        raise Transient(str(exc), spent=reader.tokens_so_far) from None
    finally:
        shard.in_flight -= 1
    try:
        return reader.result(time.perf_counter() - start)
    except MalformedReply as exc:
        raise Transient(str(exc), spent=reader.tokens_so_far) from None


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
