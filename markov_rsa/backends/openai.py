"""OpenAIBackend: any OpenAI-compatible endpoint (vLLM, SGLang, llama.cpp, Zyphra Cloud), async.

Requests of a round go out at once, bounded by ``max_concurrency`` and spread over one or more
base URLs, least busy first; an endpoint that keeps failing is taken out of rotation for a while
and the others carry on. Transient faults (408/409/429/5xx, timeouts, dropped connections, broken
bodies) are retried with jittered exponential backoff that honours ``Retry-After``, capped in
attempts and in total time; requests that cannot succeed (400/401/403/404) fail at once with a
message that says what to fix.

The API key is held privately: it is sent as a header and never appears in a repr, a log line,
an error message or a result.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import json
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx

from markov_rsa.backends.base import (
    APPROX_CHARS_PER_TOKEN,
    BackendInfo,
    FinishReason,
    Generation,
    GenerationRequest,
    TokenizerKind,
)
from markov_rsa.errors import (
    AuthenticationError,
    BackendRequestError,
    BackendUnavailableError,
    MissingDependencyError,
    ModelNotFoundError,
)

RETRY_STATUSES = frozenset({408, 409, 425, 429})
#: Connections per httpx pool; more concurrency is spread over several pools.
SHARD_CONNECTIONS = 32


@dataclass
class _Shard:
    client: httpx.AsyncClient
    in_flight: int = 0


@dataclass(frozen=True)
class RetryPolicy:
    """How transient failures are retried. ``max_elapsed`` bounds one request's total time."""

    max_attempts: int = 6
    initial_backoff: float = 0.5
    max_backoff: float = 30.0
    max_elapsed: float = 900.0
    #: How long an endpoint that failed ``eject_after`` times in a row stays out of rotation.
    cooldown: float = 30.0
    eject_after: int = 3

    def backoff(self, attempt: int, rng: random.Random) -> float:
        ceiling = min(self.max_backoff, self.initial_backoff * 2**attempt)
        return rng.uniform(ceiling / 2, ceiling)  # "equal jitter": never zero, never synchronised


@dataclass
class _Endpoint:
    url: str
    in_flight: int = 0
    consecutive_failures: int = 0
    down_until: float = 0.0
    served: int = 0

    @property
    def root(self) -> str:
        """The server root (tokenizer endpoints live beside /v1, not under it)."""
        return self.url[: -len("/v1")] if self.url.endswith("/v1") else self.url


class _Transient(Exception):
    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        parsed = email.utils.parsedate_to_datetime(value)
        return max(0.0, parsed.timestamp() - time.time()) if parsed else None


def _server_message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:200].strip()
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict):
            return str(err.get("message") or err.get("detail") or err)[:300]
        return str(body.get("detail") or err)[:300]
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
    timeout: float = 600.0
    connect_timeout: float = 10.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    transport: httpx.AsyncBaseTransport | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        urls = [self.base_url] if isinstance(self.base_url, str) else list(self.base_url)
        if not urls:
            raise BackendRequestError("base_url: give at least one endpoint URL")
        for url in urls:
            if not url.startswith(("http://", "https://")):
                raise BackendRequestError(f"base_url: {url!r} is not an http(s) URL (e.g. http://127.0.0.1:8000/v1)")
        self._endpoints = [_Endpoint(u.rstrip("/")) for u in urls]
        self._clients: dict[int, list[_Shard]] = {}
        self._semaphores: dict[int, asyncio.Semaphore] = {}
        self._rng = random.Random()
        self._route: _TokenizerRoute | None = None
        self._hf_tokenizer: Any = None
        self._tokenizer_kind: TokenizerKind | None = None
        self._probe_lock: asyncio.Lock | None = None
        self._template_cache: dict[str, list[int]] = {}

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

    def _pick(self, avoid: _Endpoint | None = None) -> _Endpoint:
        """The least busy live endpoint; a retry goes elsewhere than ``avoid`` (where it just failed)
        whenever another live endpoint exists."""
        now = time.monotonic()
        live = [e for e in self._endpoints if e.down_until <= now and e is not avoid] or [
            e for e in self._endpoints if e.down_until <= now
        ]
        pool = live or [min(self._endpoints, key=lambda e: e.down_until)]
        return min(pool, key=lambda e: (e.in_flight, e.served))

    @property
    def endpoints(self) -> list[dict[str, Any]]:
        """Load and health per endpoint (for status displays and tests)."""
        now = time.monotonic()
        return [
            {"url": e.url, "in_flight": e.in_flight, "served": e.served, "healthy": e.down_until <= now}
            for e in self._endpoints
        ]

    @property
    def info(self) -> BackendInfo:
        return BackendInfo(
            kind="openai",
            model=self.model,
            device=None,
            tokenizer=self._tokenizer_kind or "approximate",
            extra={"endpoints": [e.url for e in self._endpoints], "api": self.endpoint},
        )

    def __repr__(self) -> str:
        key = "set" if self.api_key else "none"
        return f"OpenAIBackend(base_url={[e.url for e in self._endpoints]!r}, model={self.model!r}, api_key={key})"

    async def aclose(self) -> None:
        loops, self._clients = list(self._clients.values()), {}
        for shards in loops:
            for shard in shards:
                with contextlib.suppress(RuntimeError):  # its loop is gone; nothing left to release
                    await shard.client.aclose()

    # -- generation ---------------------------------------------------------------------------
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
        return body

    def _body(self, request: GenerationRequest) -> tuple[str, dict[str, Any]]:
        body = self._sampling_fields(request)
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

    async def generate(self, request: GenerationRequest) -> Generation:
        start = time.perf_counter()
        await self.ready()  # the server's flavour decides how top-k is disabled
        if request.assistant_prefix_ids is not None and self._renders_chat_ids():
            # Continue a chunk from exact token ids: the chat template's ids, then the carried ids.
            body = self._sampling_fields(request)
            body["prompt"] = [*await self._chat_prompt_ids(request.messages), *request.assistant_prefix_ids]
            body.update(self.extra_body)
            return await self._call("/completions", body,
                                    parse=lambda data: self._parse(data, time.perf_counter() - start, completions=True))
        path, body = self._body(request)
        parse = lambda data: self._parse(data, time.perf_counter() - start)  # noqa: E731
        if not body.get("continue_final_message"):
            return await self._call(path, body, parse=parse)
        try:
            return await self._call(path, body, parse=parse)
        except BackendRequestError as exc:
            if exc.status_code != 400:
                raise
            raise BackendRequestError(
                "chunked rollouts: the server could not continue the assistant message (its chat template may "
                "not support continue_final_message); pass --tokenizer NAME (a Hugging Face tokenizer) so that "
                f"chunks continue from exact token ids over /v1/completions. Server said: {exc}", 400) from None

    def _parse(self, data: Any, latency: float, *, completions: bool = False) -> Generation:
        choices = data.get("choices") if isinstance(data, dict) else None
        if not choices or not isinstance(choices, list) or not isinstance(choices[0], dict):
            raise _Transient("the server returned no choices")
        choice = choices[0]
        if completions or self.endpoint == "completions":
            text, reasoning = choice.get("text") or "", None
        else:
            message = choice.get("message") or {}
            text = message.get("content") or ""
            reasoning = message.get("reasoning_content") or message.get("reasoning")
        raw_finish = choice.get("finish_reason")
        finish: FinishReason = "tool_calls" if raw_finish == "function_call" else str(raw_finish or "stop")
        usage = data.get("usage") or {}
        details = usage.get("completion_tokens_details") or {}
        completion = usage.get("completion_tokens")
        if completion is None:
            completion = -(-len(text + (reasoning or "")) // APPROX_CHARS_PER_TOKEN)
        return Generation(
            text=text,
            finish_reason=finish,
            completion_tokens=int(completion),
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            reasoning=reasoning,
            reasoning_tokens=details.get("reasoning_tokens"),
            latency=latency,
        )

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

    async def _call(
        self,
        path: str,
        body: dict[str, Any],
        *,
        root: bool = False,
        parse: Callable[[Any], Any] = lambda data: data,
        attempts: int | None = None,
    ) -> Any:
        """POST with retries; ``parse`` turns the JSON body into the result and may reject it as
        transient (a body without choices is retried like a 503)."""
        policy = self.retry
        max_attempts = attempts or policy.max_attempts
        started = time.monotonic()
        last = "no attempt was made"
        attempt = 0
        failed: _Endpoint | None = None
        for attempt in range(max_attempts):
            endpoint = self._pick(avoid=failed)
            wait: float | None = None
            async with self._semaphore():
                endpoint.in_flight += 1
                try:
                    data = parse(await self._post_once(endpoint, path, body, root=root))
                except _Transient as exc:
                    last = f"{endpoint.url}: {exc}"
                    failed = endpoint
                    wait = exc.retry_after
                    endpoint.consecutive_failures += 1
                    if endpoint.consecutive_failures >= policy.eject_after and len(self._endpoints) > 1:
                        endpoint.down_until = time.monotonic() + policy.cooldown
                else:
                    endpoint.consecutive_failures = 0
                    endpoint.down_until = 0.0
                    endpoint.served += 1
                    return data
                finally:
                    endpoint.in_flight -= 1
            delay = wait if wait is not None else policy.backoff(attempt, self._rng)
            healthy_elsewhere = any(e is not endpoint and e.down_until <= time.monotonic() for e in self._endpoints)
            if healthy_elsewhere and wait is None:
                delay = 0.0  # another replica can take it right away
            if attempt + 1 >= max_attempts:
                break
            if time.monotonic() - started + delay > policy.max_elapsed:
                last += f" (gave up: retrying would exceed {policy.max_elapsed:.0f}s)"
                break
            await asyncio.sleep(delay)
        raise BackendUnavailableError(f"request failed after {attempt + 1} attempt(s): {last}")

    async def _post_once(self, endpoint: _Endpoint, path: str, body: dict[str, Any], *, root: bool) -> Any:
        url = (endpoint.root if root else endpoint.url) + path
        shard = self._client()
        shard.in_flight += 1
        try:
            response = await shard.client.post(url, json=body)
        except httpx.TimeoutException:
            raise _Transient(f"timed out after {self.timeout:.0f}s") from None
        except httpx.TransportError as exc:
            raise _Transient(f"connection failed ({type(exc).__name__})") from None
        finally:
            shard.in_flight -= 1
        status = response.status_code
        if status in RETRY_STATUSES or status >= 500:
            raise _Transient(f"HTTP {status}: {_server_message(response)}", _retry_after(response))
        if status in (401, 403):
            raise AuthenticationError(
                f"{endpoint.url} rejected the API key (HTTP {status}); check the key (--api-key-env)", status
            )
        if status == 404:
            detail = _server_message(response)
            hint = (f"the server does not serve model {self.model!r}" if "model" in detail.lower()
                    else f"no such path {path} (base URLs usually end in /v1)")
            raise ModelNotFoundError(f"{endpoint.url}: HTTP 404, {hint}: {detail}", status)
        if status >= 400:
            detail = _server_message(response)
            raise BackendRequestError(f"{endpoint.url} refused the request (HTTP {status}): {detail}", status)
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
            return "exact"
        return served

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
            urls = ", ".join(e.url for e in self._endpoints)
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
