"""OpenAIBackend: any OpenAI-compatible endpoint (vLLM, SGLang, llama.cpp, Zyphra Cloud), async.

Every generation streams (SSE) and is read as it arrives, so a rollout that thinks for twenty
minutes is never cut off by a timeout: ``timeout`` bounds the connect and the longest silence
between chunks, and an optional ``deadline`` bounds a whole request. Requests of a round go out at
once, bounded by ``max_concurrency`` and spread over replicas (:mod:`~markov_rsa.backends.replicas`:
one run's requests go where its prompt prefix is cached). Transient faults (408/409/425/429/5xx,
timeouts, dropped connections, malformed bodies or streams) are retried with jittered exponential
backoff that honours ``Retry-After`` (:class:`~markov_rsa.backends.retry.RetryPolicy`); requests that
cannot succeed (400/401/403/404) fail at once with a message that says what to fix. Every retry
decision is logged at debug level under ``markov_rsa.backends.openai``.

Where the server returns the generated token ids (vLLM's ``return_token_ids``), tails are cut from
them, with no tokenize call. The API key is held privately: it is sent as a header and never
appears in a repr, a log line, an error message or a result.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import re
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx

from markov_rsa.backends.base import BackendInfo, Generation, GenerationRequest, TokenizerKind
from markov_rsa.backends.replicas import Replica, ReplicaPool
from markov_rsa.backends.retry import RetryPolicy, Timeouts, parse_retry_after
from markov_rsa.backends.sse import MalformedReply, StreamReader
from markov_rsa.errors import (
    AuthenticationError,
    BackendRequestError,
    BackendUnavailableError,
    MissingDependencyError,
    ModelNotFoundError,
)

__all__ = ["OpenAIBackend", "RetryPolicy", "Timeouts"]

logger = logging.getLogger("markov_rsa.backends.openai")

RETRY_STATUSES = frozenset({408, 409, 425, 429})
#: Connections per httpx pool; more concurrency is spread over several pools.
SHARD_CONNECTIONS = 32
#: Request fields only some servers take: dropped (once, with a log line) when a server refuses them.
OPTIONAL_FIELDS = ("return_token_ids", "top_k", "stream_options")


@dataclass
class _Shard:
    client: httpx.AsyncClient
    in_flight: int = 0


class _Transient(Exception):
    def __init__(self, message: str, retry_after: float | None = None, spent: int = 0) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        #: Tokens the failed attempt had already streamed (paid for, thrown away).
        self.spent = spent


def _server_message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:200].strip()
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict):
            return str(err.get("message") or err.get("detail") or err)[:300]
        return str(body.get("detail") or body.get("message") or err)[:300]
    return str(body)[:300]


@dataclass
class _TokenizerRoute:
    tokenize: str
    detokenize: str
    style: Literal["vllm", "llamacpp-python", "llamacpp"]
    strip_prefix: tuple[int, ...] = ()


@dataclass
class OpenAIBackend:
    """An OpenAI-compatible endpoint, or several replicas of one model.

    ``tokenizer`` may name a Hugging Face tokenizer to cut tails locally; otherwise the server's
    tokenize endpoints are used (vLLM, SGLang, llama.cpp), and only if it has none are tails cut
    on an approximation, which every result then records.
    """

    base_url: str | Sequence[str]
    model: str
    api_key: str | None = field(default=None, repr=False)
    endpoint: Literal["chat", "completions"] = "chat"
    extra_body: Mapping[str, Any] = field(default_factory=dict)
    tokenizer: str | None = None
    max_concurrency: int = 64
    #: Seconds for the connect and the longest silence between two streamed chunks.
    timeout: float = 600.0
    connect_timeout: float = 10.0
    #: Seconds for a whole request, streaming included (None: no limit).
    deadline: float | None = None
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    #: Stream generations (off only for servers that cannot).
    stream: bool = True
    #: Send one run's requests to the replica that holds its prompt prefix.
    affinity: bool = True
    transport: httpx.AsyncBaseTransport | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        urls = [self.base_url] if isinstance(self.base_url, str) else list(self.base_url)
        if not urls:
            raise BackendRequestError("base_url: give at least one endpoint URL")
        for url in urls:
            if not url.startswith(("http://", "https://")):
                raise BackendRequestError(f"base_url: {url!r} is not an http(s) URL (e.g. http://127.0.0.1:8000/v1)")
        self._pool = ReplicaPool([u.rstrip("/") for u in urls], self.retry, affinity=self.affinity)
        self._clients: dict[int, list[_Shard]] = {}
        self._semaphores: dict[int, asyncio.Semaphore] = {}
        self._rng = random.Random()
        self._route: _TokenizerRoute | None = None
        self._hf_tokenizer: Any = None
        self._tokenizer_kind: TokenizerKind | None = None
        self._probe_lock: asyncio.Lock | None = None
        self._template_cache: dict[str, list[int]] = {}
        self._refused: set[str] = set()
        self._think_close: int | None = None
        self._think_opened = False
        #: Requests sent, retries and requests that failed for good (for /metrics and operators).
        self.stats: Counter[str] = Counter()

    @property
    def timeouts(self) -> Timeouts:
        return Timeouts(silence=self.timeout, connect=self.connect_timeout, deadline=self.deadline)

    # -- plumbing -----------------------------------------------------------------------------
    def _new_client(self, connections: int) -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        return httpx.AsyncClient(
            headers=headers,
            timeout=httpx.Timeout(self.timeout, connect=self.connect_timeout),
            limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections),
            transport=self.transport,
        )

    def _client(self) -> _Shard:
        """The least busy connection pool of this event loop (a backend may outlive a loop).

        httpcore's pool does work proportional to its queued requests times its connections on
        every event, which turns quadratic with a thousand requests in flight; several small pools
        keep each one short.
        """
        loop = id(asyncio.get_running_loop())
        shards = self._clients.get(loop)
        if shards is None or any(shard.client.is_closed for shard in shards):
            count = max(1, -(-self.max_concurrency // SHARD_CONNECTIONS))
            size = min(self.max_concurrency, SHARD_CONNECTIONS)
            shards = [_Shard(self._new_client(size)) for _ in range(count)]
            self._clients[loop] = shards
        return min(shards, key=lambda shard: shard.in_flight)

    def _semaphore(self) -> asyncio.Semaphore:
        loop = id(asyncio.get_running_loop())
        if loop not in self._semaphores:
            self._semaphores[loop] = asyncio.Semaphore(self.max_concurrency)
        return self._semaphores[loop]

    @property
    def endpoints(self) -> list[dict[str, Any]]:
        """Load and health per replica (for status displays and tests)."""
        return self._pool.status()

    @property
    def info(self) -> BackendInfo:
        return BackendInfo(
            kind="openai",
            model=self.model,
            device=None,
            tokenizer=self._tokenizer_kind or "approximate",
            extra={"endpoints": [r.url for r in self._pool.replicas], "api": self.endpoint},
        )

    def __repr__(self) -> str:
        key = "set" if self.api_key else "none"
        urls = [r.url for r in self._pool.replicas]
        return f"OpenAIBackend(base_url={urls!r}, model={self.model!r}, api_key={key})"

    async def aclose(self) -> None:
        loops, self._clients = list(self._clients.values()), {}
        for shards in loops:
            for shard in shards:
                with contextlib.suppress(RuntimeError):  # its loop is gone; nothing left to release
                    await shard.client.aclose()

    # -- request bodies -----------------------------------------------------------------------
    def _top_k_disabled(self) -> int:
        """Top-k off, in the form the server accepts: -1 for vLLM and SGLang, 0 for llama.cpp."""
        return 0 if self._route is not None and self._route.style.startswith("llamacpp") else -1

    def _sampling_fields(self, request: GenerationRequest) -> dict[str, Any]:
        """Every sampling field stated: a missing one would be filled from the model's
        generation_config.json by vLLM, silently changing the method's settings."""
        s = request.sampling
        body: dict[str, Any] = {
            "model": self.model, "max_tokens": request.max_tokens, "temperature": s.temperature, "top_p": s.top_p,
            "top_k": s.top_k if s.top_k else self._top_k_disabled(),
        }
        if s.seed is not None:
            body["seed"] = s.seed
        if s.stop:
            body["stop"] = list(s.stop)
        if self.stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        if self._route is not None and self._route.style == "vllm":
            body["return_token_ids"] = True  # exact tails without a tokenize call
        return body

    def _body(self, request: GenerationRequest) -> tuple[str, dict[str, Any]]:
        body = {**request.extra, **self._sampling_fields(request)}
        if request.tools:
            body["tools"] = list(request.tools)
            if request.tool_choice is not None:
                body["tool_choice"] = request.tool_choice
        if self.endpoint == "completions":
            prompt = "\n\n".join(m["content"] for m in request.messages) + "\n\n" + request.assistant_prefix
            body["prompt"] = prompt
            path = "/completions"
        else:
            messages = [dict(m) for m in request.messages]
            if request.assistant_prefix:
                # Continue the assistant's turn (vLLM/SGLang semantics) rather than start a new one.
                messages.append({"role": "assistant", "content": request.assistant_prefix})
                body["continue_final_message"] = True
                body["add_generation_prompt"] = False
            body["messages"] = messages
            path = "/chat/completions"
        body.update(self.extra_body)
        return path, body

    async def ready(self) -> None:
        if self._tokenizer_kind is not None:
            return
        if self._probe_lock is None:
            self._probe_lock = asyncio.Lock()
        async with self._probe_lock:
            if self._tokenizer_kind is None:
                self._tokenizer_kind = await self._probe_tokenizer()

    # -- generation ---------------------------------------------------------------------------
    async def generate(self, request: GenerationRequest) -> Generation:
        start = time.perf_counter()
        await self.ready()  # the server's flavour decides how top-k is disabled
        completions = self.endpoint == "completions"
        if request.assistant_prefix_ids is not None and self._renders_chat_ids() and not request.tools:
            # Continue a chunk from exact token ids: the chat template's ids, then the carried ids.
            body = self._sampling_fields(request)
            body["prompt"] = [*await self._chat_prompt_ids(request.messages), *request.assistant_prefix_ids]
            body.update(self.extra_body)
            path, completions = "/completions", True
        else:
            path, body = self._body(request)
        try:
            gen = await self._generate(path, body, request, completions, start)
        except BackendRequestError as exc:
            if not body.get("continue_final_message") or exc.status_code != 400:
                raise
            raise BackendRequestError(
                "chunked rollouts: the server could not continue the assistant message (its chat template may "
                "not support continue_final_message); pass --tokenizer NAME (a Hugging Face tokenizer) so that "
                f"chunks continue from exact token ids over /v1/completions. Server said: {exc}", 400) from None
        if self._think_opened and gen.reasoning is None and not completions:
            gen = Generation(**{**gen.__dict__, "think_opened": True})
        return self._with_reasoning_count(gen)

    async def _generate(self, path: str, body: dict[str, Any], request: GenerationRequest, completions: bool,
                        start: float) -> Generation:
        spent = 0
        tries = 0

        async def attempt(replica: Replica) -> Generation:
            nonlocal spent, tries
            tries += 1
            try:
                if body.get("stream"):
                    gen = await self._stream_once(replica, path, body, request, completions, start)
                else:
                    gen = self._parse(await self._post_once(replica, path, body, root=False),
                                      time.perf_counter() - start, completions=completions)
            except _Transient as exc:
                spent += exc.spent
                raise
            return gen

        for _ in range(len(OPTIONAL_FIELDS) + 1):
            try:
                gen = await self._retrying(attempt, key=request.affinity, what=f"{path} {_tags(request)}")
            except BackendRequestError as exc:
                dropped = self._drop_refused_field(body, exc)
                if dropped is None:
                    raise
                continue
            return Generation(**{**gen.__dict__, "discarded_tokens": spent, "requests": tries})
        raise AssertionError("unreachable")  # pragma: no cover

    def _drop_refused_field(self, body: dict[str, Any], exc: BackendRequestError) -> str | None:
        """A 400 that names a field only some servers take: send without it from now on."""
        if exc.status_code != 400:
            return None
        message = str(exc).lower()
        for name in OPTIONAL_FIELDS:
            if name in body and name.lower() in message:
                body.pop(name)
                if name == "stream_options":
                    body.pop("stream", None)
                self._refused.add(name)
                logger.info("the server refused %r; sending requests without it", name)
                return name
        return None

    async def _stream_once(self, replica: Replica, path: str, body: dict[str, Any], request: GenerationRequest,
                           completions: bool, start: float) -> Generation:
        url = replica.url + path
        shard = self._client()
        shard.in_flight += 1
        reader = StreamReader(completions=completions)
        try:
            async with contextlib.AsyncExitStack() as stack:
                response = await stack.enter_async_context(shard.client.stream("POST", url, json=body))
                if response.status_code != 200:
                    await response.aread()
                    self._raise_for_status(replica, path, response)
                last = time.monotonic()
                async for line in self._lines(response):
                    now = time.monotonic()
                    if now - last > max(30.0, self.timeout / 4):
                        logger.info("stream from %s resumed after %.0fs of silence", replica.url, now - last)
                    last = now
                    if reader.feed_line(line) and request.on_progress is not None:
                        request.on_progress(reader.tokens_so_far)
                    if reader.done:
                        break
        except httpx.TimeoutException:
            logger.warning("stream from %s was silent for %.0fs (--timeout); retrying", replica.url, self.timeout)
            raise _Transient(f"no data for {self.timeout:.0f}s", spent=reader.tokens_so_far) from None
        except httpx.TransportError as exc:
            raise _Transient(f"connection failed ({type(exc).__name__})", spent=reader.tokens_so_far) from None
        except MalformedReply as exc:
            raise _Transient(str(exc), spent=reader.tokens_so_far) from None
        finally:
            shard.in_flight -= 1
        try:
            return reader.result(time.perf_counter() - start)
        except MalformedReply as exc:
            raise _Transient(str(exc), spent=reader.tokens_so_far) from None

    async def _lines(self, response: httpx.Response) -> Any:
        deadline = self.deadline
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
                raise _Transient(f"the request ran past its {deadline:.0f}s deadline") from None
            yield line

    def _parse(self, data: Any, latency: float, *, completions: bool = False) -> Generation:
        """A non-streamed completion (for servers that cannot stream)."""
        choices = data.get("choices") if isinstance(data, dict) else None
        if not choices or not isinstance(choices, list) or not isinstance(choices[0], dict):
            raise _Transient("the server returned no choices")
        choice = dict(choices[0])
        reader = StreamReader(completions=completions)
        if not completions:
            message = choice.pop("message", None) or {}
            if not isinstance(message, dict):
                raise _Transient("the server returned a message that is not an object")
            choice["delta"] = message
        reader.feed_line("data: " + json.dumps({"choices": [choice], "usage": data.get("usage")}))
        if reader.finish_reason is None:
            reader.finish_reason = "stop"
        try:
            return reader.result(latency)
        except MalformedReply as exc:
            raise _Transient(str(exc)) from None

    def _with_reasoning_count(self, gen: Generation) -> Generation:
        """With token ids and a split-out reasoning, count the reasoning's ids (up to the think-close
        token), so its tail can be cut from the ids without a tokenize call."""
        if gen.token_ids is None or gen.reasoning is None or gen.reasoning_tokens is not None:
            return gen
        if self._think_close is None or self._think_close not in gen.token_ids:
            return gen if gen.text else Generation(**{**gen.__dict__, "reasoning_tokens": len(gen.token_ids)})
        count = len(gen.token_ids) - 1 - gen.token_ids[::-1].index(self._think_close)
        return Generation(**{**gen.__dict__, "reasoning_tokens": count})

    def _renders_chat_ids(self) -> bool:
        """Whether chat prompts can be rendered to exact token ids: a Hugging Face tokenizer, a server
        whose tokenize endpoint applies the chat template (vLLM, SGLang), or llama.cpp's server
        (/apply-template, then /tokenize)."""
        return self._hf_tokenizer is not None or (
            self._route is not None and self._route.style in ("vllm", "llamacpp"))

    async def _chat_prompt_ids(self, messages: tuple[dict[str, str], ...]) -> list[int]:
        """The chat template applied to ``messages`` with the assistant turn opened, as token ids.
        Cached: every chunk of a rollout, and every rollout of a stage, shares its messages."""
        key = json.dumps(messages, sort_keys=True)
        cached = self._template_cache.get(key)
        if cached is not None:
            return cached
        if self._hf_tokenizer is not None:
            rendered = self._hf_tokenizer.apply_chat_template(list(messages), add_generation_prompt=True,
                                                              tokenize=True)
            ids = [int(t) for t in (rendered["input_ids"] if isinstance(rendered, Mapping) else rendered)]
        elif self._route is not None and self._route.style == "llamacpp":
            rendered = await self._call("/apply-template", {"messages": list(messages)}, root=True, attempts=2)
            body: dict[str, Any] = {"content": str(rendered["prompt"]), "add_special": True, "parse_special": True}
            data = await self._call(self._route.tokenize, body, root=True, attempts=2)
            ids = [int(t) for t in data["tokens"]]
        else:
            body = {"model": self.model, "messages": list(messages), "add_generation_prompt": True}
            assert self._route is not None
            data = await self._call(self._route.tokenize, body, root=True, attempts=2)
            ids = [int(t) for t in data["tokens"]]
        if len(self._template_cache) >= 256:
            self._template_cache.pop(next(iter(self._template_cache)))
        self._template_cache[key] = ids
        return ids

    # -- pass-through -------------------------------------------------------------------------
    async def relay(self, body: dict[str, Any]) -> Relayed:
        """Send a client's chat request upstream as it came (only ``model`` is set to the served one) and
        return the reply: its status and JSON body, or for ``stream: true`` its raw SSE bytes. Transient
        failures before the reply starts are retried; an upstream 4xx comes back with its status and
        message only (no upstream address, no raw body); an upstream that rejects this server's key is a
        :class:`AuthenticationError`."""
        await self.ready()
        body = {**body, "model": self.model}
        streamed = bool(body.get("stream"))

        async def attempt(replica: Replica) -> Relayed:
            shard = self._client()
            url = replica.url + "/chat/completions"
            if not streamed:
                try:
                    response = await shard.client.post(url, json=body)
                except httpx.TimeoutException:
                    raise _Transient(f"timed out after {self.timeout:.0f}s") from None
                except httpx.TransportError as exc:
                    raise _Transient(f"connection failed ({type(exc).__name__})") from None
                return self._relayed(replica, response, None)
            stack = contextlib.AsyncExitStack()
            try:
                response = await stack.enter_async_context(shard.client.stream("POST", url, json=body))
                if response.status_code != 200:
                    await response.aread()
                    await stack.aclose()
                    return self._relayed(replica, response, None)
            except httpx.TimeoutException:
                await stack.aclose()
                raise _Transient(f"timed out after {self.timeout:.0f}s") from None
            except httpx.TransportError as exc:
                await stack.aclose()
                raise _Transient(f"connection failed ({type(exc).__name__})") from None
            except BaseException:
                await stack.aclose()
                raise
            return self._relayed(replica, response, stack)

        return await self._retrying(attempt, what="/chat/completions (pass-through)")

    def _relayed(self, replica: Replica, response: httpx.Response, stack: contextlib.AsyncExitStack | None
                 ) -> Relayed:
        status = response.status_code
        if status in RETRY_STATUSES or status >= 500:
            raise _Transient(f"HTTP {status}: {_server_message(response)}",
                             parse_retry_after(response.headers.get("retry-after")))
        if status in (401, 403):
            raise AuthenticationError(f"{replica.url} rejected this server's API key (HTTP {status})", status)
        if status != 200:
            return Relayed(status, {"error": {"message": scrub(_server_message(response)),
                                              "type": "invalid_request_error", "param": None, "code": None}})
        if stack is None:
            try:
                return Relayed(200, response.json())
            except (ValueError, json.JSONDecodeError):
                raise _Transient("the server sent a body that is not JSON") from None
        return Relayed(200, None, _chunks(response, stack))

    # -- one request, retried -----------------------------------------------------------------
    async def _call(self, path: str, body: dict[str, Any], *, root: bool = False, attempts: int | None = None) -> Any:
        """POST a small JSON request (tokenize, detokenize, templates) with retries."""

        async def attempt(replica: Replica) -> Any:
            return await self._post_once(replica, path, body, root=root)

        return await self._retrying(attempt, attempts=attempts, what=path)

    async def _retrying(self, attempt: Callable[[Replica], Awaitable[Any]], *, key: str | None = None,
                        attempts: int | None = None, what: str = "") -> Any:
        """Run ``attempt`` on a replica, retrying transient failures elsewhere with backoff."""
        policy = self.retry
        max_attempts = attempts or policy.max_attempts
        waited = 0.0
        last = "no attempt was made"
        number = 0
        failed: Replica | None = None
        for number in range(max_attempts):
            replica = self._pool.pick(key, avoid=failed)
            wait: float | None = None
            async with self._semaphore():
                replica.in_flight += 1
                self.stats["requests"] += 1
                try:
                    result = await attempt(replica)
                except _Transient as exc:
                    last = f"{replica.url}: {exc}"
                    failed, wait = replica, exc.retry_after
                    self._pool.failed(replica)
                except BackendRequestError:
                    self.stats["errors"] += 1
                    raise
                else:
                    self._pool.succeeded(replica)
                    return result
                finally:
                    replica.in_flight -= 1
            delay = wait if wait is not None else policy.backoff(number, self._rng)
            if self._pool.healthy_besides(replica) and wait is None:
                delay = 0.0  # another replica can take it right away
            if number + 1 >= max_attempts:
                logger.debug("%s: giving up after %d attempt(s): %s", what, number + 1, last)
                break
            if waited + delay > policy.max_elapsed:
                last += f" (gave up: retrying would exceed {policy.max_elapsed:.0f}s)"
                logger.debug("%s: giving up: %s", what, last)
                break
            self.stats["retries"] += 1
            logger.debug("%s: attempt %d failed (%s); retrying in %.2fs%s", what, number + 1, last, delay,
                         " (Retry-After)" if wait is not None else "")
            waited += delay
            await asyncio.sleep(delay)
        self.stats["errors"] += 1
        raise BackendUnavailableError(f"request failed after {number + 1} attempt(s): {last}")

    def _raise_for_status(self, replica: Replica, path: str, response: httpx.Response) -> None:
        status = response.status_code
        if status in RETRY_STATUSES or status >= 500:
            raise _Transient(f"HTTP {status}: {_server_message(response)}",
                             parse_retry_after(response.headers.get("retry-after")))
        if status in (401, 403):
            raise AuthenticationError(
                f"{replica.url} rejected the API key (HTTP {status}); check the key (--api-key-env)", status
            )
        if status == 404:
            detail = _server_message(response)
            hint = (f"the server does not serve model {self.model!r}" if "model" in detail.lower()
                    else f"no such path {path} (base URLs usually end in /v1)")
            raise ModelNotFoundError(f"{replica.url}: HTTP 404, {hint}: {detail}", status)
        if status >= 400:
            detail = _server_message(response)
            raise BackendRequestError(f"{replica.url} refused the request (HTTP {status}): {detail}", status)

    async def _post_once(self, replica: Replica, path: str, body: dict[str, Any], *, root: bool) -> Any:
        url = (replica.root if root else replica.url) + path
        shard = self._client()
        shard.in_flight += 1
        try:
            coro = shard.client.post(url, json=body)
            response = await (asyncio.wait_for(coro, self.deadline) if self.deadline else coro)
        except (httpx.TimeoutException, asyncio.TimeoutError):
            raise _Transient(f"timed out after {self.timeout:.0f}s") from None
        except httpx.TransportError as exc:
            raise _Transient(f"connection failed ({type(exc).__name__})") from None
        finally:
            shard.in_flight -= 1
        self._raise_for_status(replica, path, response)
        try:
            return response.json()
        except (ValueError, json.JSONDecodeError):
            raise _Transient("the server sent a body that is not JSON") from None

    # -- tokenizer ----------------------------------------------------------------------------
    async def _probe_tokenizer(self) -> TokenizerKind:
        """Find the server's tokenize endpoints (which also tell what server it is: top-k is disabled
        differently on llama.cpp), then load a Hugging Face tokenizer if one was named."""
        served = await self._probe_routes()
        if self.tokenizer:
            try:
                from transformers import AutoTokenizer
            except ImportError:
                raise MissingDependencyError(
                    "tokenizer: a Hugging Face tokenizer needs transformers: pip install 'markov-rsa[local]'"
                ) from None
            self._hf_tokenizer = await asyncio.to_thread(AutoTokenizer.from_pretrained, self.tokenizer)
            served = "exact"
        with contextlib.suppress(BackendUnavailableError, BackendRequestError, KeyError, TypeError, ValueError):
            self._think_opened = await self._template_opens_think()
        if served == "exact":
            with contextlib.suppress(BackendUnavailableError, BackendRequestError, KeyError, TypeError, ValueError):
                close = (list(self._hf_tokenizer.encode("</think>", add_special_tokens=False))
                         if self._hf_tokenizer is not None else await self._tokenize_remote("</think>"))
                self._think_close = close[0] if len(close) == 1 else None  # a special token of its own
        return served

    async def _template_opens_think(self) -> bool:
        """Whether the served chat template opens a think block at the assistant's turn (so a reply that
        never closes it is unfinished reasoning). Read from the rendered template where the server or a
        Hugging Face tokenizer can render it; otherwise assumed not."""
        sample = [{"role": "user", "content": "1+1?"}]
        if self._hf_tokenizer is not None:
            rendered = str(self._hf_tokenizer.apply_chat_template(sample, add_generation_prompt=True, tokenize=False))
        elif self._route is not None and self._route.style == "llamacpp":
            rendered = str((await self._call("/apply-template", {"messages": sample}, root=True, attempts=1))["prompt"])
        elif self._route is not None and self._route.style == "vllm":
            data = await self._call(self._route.tokenize, {"model": self.model, "messages": sample,
                                                           "add_generation_prompt": True}, root=True, attempts=1)
            rendered = await self._detokenize_remote([int(t) for t in data["tokens"]][-8:])
        else:
            return False
        return rendered.rstrip().endswith("<think>")

    async def _probe_routes(self) -> TokenizerKind:
        routes = (
            _TokenizerRoute("/tokenize", "/detokenize", "vllm"),
            _TokenizerRoute("/extras/tokenize", "/extras/detokenize", "llamacpp-python"),
            _TokenizerRoute("/tokenize", "/detokenize", "llamacpp"),
        )
        probe = "Markovian tails: 12 + 30 = 42."
        unreachable: BackendUnavailableError | None = None
        answered = False
        for route in routes:
            try:
                self._route = route
                empty = await self._tokenize_remote("")
                route.strip_prefix = tuple(empty)
                ids = await self._tokenize_remote(probe)
                if ids and (await self._detokenize_remote(ids)).strip() == probe:
                    return "exact"
                answered = True
            except BackendUnavailableError as exc:
                unreachable = exc
            except (BackendRequestError, KeyError, TypeError, ValueError):
                answered = True  # the server answered: it just has no such endpoint
        self._route = None
        if unreachable is not None and not answered:
            urls = ", ".join(r.url for r in self._pool.replicas)
            raise BackendUnavailableError(f"cannot reach {urls}; is the server running? ({unreachable})")
        return "approximate"

    async def _tokenize_remote(self, text: str) -> list[int]:
        route = self._route
        assert route is not None
        if route.style == "vllm":
            body: dict[str, Any] = {"model": self.model, "prompt": text, "add_special_tokens": False}
        elif route.style == "llamacpp-python":
            body = {"model": self.model, "input": text}
        else:
            body = {"content": text, "add_special": False}
        data = await self._call(route.tokenize, body, root=True, attempts=2)
        ids = [int(t) for t in data["tokens"]]
        prefix = list(route.strip_prefix)
        return ids[len(prefix):] if prefix and ids[: len(prefix)] == prefix else ids

    async def _detokenize_remote(self, ids: Sequence[int]) -> str:
        route = self._route
        assert route is not None
        body: dict[str, Any] = {"tokens": list(ids)}
        if route.style != "llamacpp":
            body["model"] = self.model
        data = await self._call(route.detokenize, body, root=True, attempts=2)
        return str(data.get("prompt", data.get("text", data.get("content", ""))))

    async def tokenize(self, text: str) -> list[int]:
        await self.ready()
        if self._hf_tokenizer is not None:
            return list(self._hf_tokenizer.encode(text, add_special_tokens=False))
        if self._route is None:
            raise BackendRequestError("tokenize: this endpoint has no tokenizer; pass tokenizer= a Hugging Face name")
        return await self._tokenize_remote(text)

    async def detokenize(self, ids: Sequence[int]) -> str:
        await self.ready()
        if self._hf_tokenizer is not None:
            return str(self._hf_tokenizer.decode(list(ids), skip_special_tokens=False))
        if self._route is None:
            raise BackendRequestError("detokenize: this endpoint has no tokenizer; pass tokenizer= a Hugging Face name")
        # A cut can land inside a multi-byte character, which some servers cannot decode: drop a token.
        for skip in range(4):
            try:
                return await self._detokenize_remote(ids[skip:])
            except BackendUnavailableError:
                if skip == 3 or len(ids) <= skip + 1:
                    raise
        raise AssertionError("unreachable")


@dataclass
class Relayed:
    """An upstream reply to a passed-through request: a JSON body, or a stream of SSE bytes."""

    status: int
    body: Any = None
    chunks: AsyncIterator[bytes] | None = None


async def _chunks(response: httpx.Response, stack: contextlib.AsyncExitStack) -> AsyncIterator[bytes]:
    """The raw bytes of a streamed reply; the upstream connection is released however iteration ends."""
    try:
        async for chunk in response.aiter_raw():
            yield chunk
    finally:
        await asyncio.shield(stack.aclose())


def scrub(message: str) -> str:
    """An upstream error message without addresses (a client must not learn where the upstream is)."""
    return re.sub(r"(https?://|\b)\d{1,3}(\.\d{1,3}){3}(:\d+)?\S*|https?://\S+", "[upstream]", message)[:300]


def _tags(request: GenerationRequest) -> str:
    return " ".join(f"{k}={v}" for k, v in request.tags.items())
