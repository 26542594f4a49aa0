"""OpenAIBackend: any OpenAI-compatible endpoint (vLLM, SGLang, llama.cpp, Zyphra Cloud), async.

The backend states a request in the server's terms and assembles the pieces that do the rest, one
job each: :mod:`.dialect` learns what the server is (tokenize endpoints, chat-template facts),
:mod:`.prompt_ids` renders chat prompts to exact token ids for chunk continuations,
:mod:`.stream` sends one streamed generation, :mod:`.routing` picks replicas and retries, and
:mod:`.http` maps every HTTP failure once. Requests that cannot succeed (400/401/403/404) fail at
once with a message that says what to fix.

Where the server returns the generated token ids (vLLM's ``return_token_ids``), tails are cut from
them, with no tokenize call. The API key is held privately: it is sent as a header and never
appears in a repr, a log line, an error message or a result.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx

from markov_rsa.backends.base import BackendInfo, Generation, GenerationRequest
from markov_rsa.backends.openai.dialect import Dialect
from markov_rsa.backends.openai.http import ClientPools, Transient, raise_for_status, transport_errors
from markov_rsa.backends.openai.prompt_ids import ChatPromptIds
from markov_rsa.backends.openai.routing import Router
from markov_rsa.backends.openai.stream import parse_reply, stream_once
from markov_rsa.backends.replicas import Replica, ReplicaPool, Routing
from markov_rsa.backends.retry import RetryPolicy, Timeouts
from markov_rsa.errors import BackendError, BackendRequestError

logger = logging.getLogger("markov_rsa.backends.openai")

#: Request fields only some servers take: dropped (once, with a log line) when a server refuses them.
OPTIONAL_FIELDS = ("return_token_ids", "top_k", "stream_options")


@dataclass
class OpenAIBackend:
    """An OpenAI-compatible endpoint, or several replicas of one model.

    ``tokenizer`` may name a Hugging Face tokenizer to cut tails locally; otherwise the server's
    tokenize endpoints are used (vLLM, SGLang, llama.cpp), and only if it has none are tails cut
    on an approximation, which every result then records.
    """

    base_url: str | Sequence[str]
    #: The served model's name; empty: the only model the server lists (``/v1/models``).
    model: str = ""
    api_key: str | None = field(default=None, repr=False)
    endpoint: Literal["chat", "completions"] = "chat"
    extra_body: Mapping[str, Any] = field(default_factory=dict)
    tokenizer: str | None = None
    max_concurrency: int = 64
    #: Seconds for the connect and the longest silence once a stream has started. Waiting for a stream's
    #: first byte (a queue for a slot, a long prefill) is not silence while the server answers /health.
    timeout: float = 600.0
    #: Seconds for the connect (None: ``timeout``).
    connect_timeout: float | None = None
    #: Seconds a stream may wait for its first byte while the server is alive (None: no limit).
    first_byte_timeout: float | None = None
    #: Seconds for a whole request, streaming included (None: no limit).
    deadline: float | None = None
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    #: Stream generations (off only for servers that cannot).
    stream: bool = True
    #: Send one run's requests to the replica that holds its prompt prefix (False: ``routing="least-busy"``).
    affinity: bool = True
    #: ``affinity``: a run's requests go where its prefix is cached while that replica has a free slot;
    #: ``least-busy``: every request goes to the least loaded replica.
    routing: Routing = "affinity"
    transport: httpx.AsyncBaseTransport | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        urls = [self.base_url] if isinstance(self.base_url, str) else list(self.base_url)
        if not urls:
            raise BackendRequestError("base_url: give at least one endpoint URL")
        for url in urls:
            if not url.startswith(("http://", "https://")):
                raise BackendRequestError(f"base_url: {url!r} is not an http(s) URL (e.g. http://127.0.0.1:8000/v1)")
        clients = ClientPools(self.max_concurrency, httpx.Timeout(self.timeout, connect=self.timeouts.connect),
                              api_key=self.api_key, transport=self.transport)
        if self.routing not in ("affinity", "least-busy"):
            raise BackendRequestError(f"routing: must be affinity or least-busy, got {self.routing!r}")
        routing: Routing = self.routing if self.affinity else "least-busy"
        pool = ReplicaPool([u.rstrip("/") for u in urls], self.retry, routing=routing)
        #: Replica choice, connection pools and retries (public: the server's pass-through relays over it).
        self.router = Router(pool, clients, self.retry, self.timeouts, self.model)
        self.dialect = Dialect(self.router, self.model, self.tokenizer)
        self._prompt_ids = ChatPromptIds(self.dialect)
        self._refused: set[str] = set()

    @property
    def stats(self) -> Counter[str]:
        """Requests sent, retries and requests that failed for good (for /metrics and operators)."""
        return self.router.stats

    @property
    def timeouts(self) -> Timeouts:
        connect = self.timeout if self.connect_timeout is None else self.connect_timeout
        return Timeouts(silence=self.timeout, connect=connect, deadline=self.deadline,
                        first_byte=self.first_byte_timeout)

    @property
    def endpoints(self) -> list[dict[str, Any]]:
        """Load and health per replica (for status displays and tests)."""
        return self.router.pool.status()

    @property
    def info(self) -> BackendInfo:
        return BackendInfo(
            kind="openai",
            model=self.model,
            device=None,
            tokenizer=self.dialect.kind or "approximate",
            extra={"endpoints": [r.url for r in self.router.pool.replicas], "api": self.endpoint},
        )

    def __repr__(self) -> str:
        key = "set" if self.api_key else "none"
        urls = [r.url for r in self.router.pool.replicas]
        return f"OpenAIBackend(base_url={urls!r}, model={self.model!r}, api_key={key})"

    async def aclose(self) -> None:
        await self.router.clients.aclose()

    async def ready(self) -> None:
        if self.dialect.kind is None:
            if not self.model:
                await self._served_model()
            await self.dialect.ready()
            await self.router.read_slots()

    async def _served_model(self) -> None:
        """No model named: use the one the server serves (``/v1/models``), or say which ones it serves."""

        async def attempt(replica: Replica) -> Any:
            with transport_errors(f"timed out after {self.timeout:.0f}s"):
                response = await self.router.clients.client().client.get(replica.url + "/models")
            raise_for_status(replica.url, "/models", response, self.model)
            try:
                return response.json()
            except (ValueError, RecursionError):
                raise Transient("the server sent a body that is not JSON") from None

        data = await self.router.retrying(attempt, what="/models")
        listed = data.get("data") if isinstance(data, dict) else None
        names = [str(m["id"]) for m in listed or [] if isinstance(m, dict) and isinstance(m.get("id"), str)][:20]
        if len(names) != 1:
            served = ", ".join(names) if names else "none listed"
            raise BackendRequestError(f"model: the server serves {served}; name one with --model")
        self.model = self.router.model = self.dialect.model = names[0]
        logger.info("using the served model %r", self.model)

    async def tokenize(self, text: str) -> list[int]:
        return await self.dialect.tokenize(text)

    async def detokenize(self, ids: Sequence[int]) -> str:
        return await self.dialect.detokenize(ids)

    # -- request bodies -----------------------------------------------------------------------
    def _sampling_fields(self, request: GenerationRequest) -> dict[str, Any]:
        """Every sampling field stated: a missing one would be filled from the model's
        generation_config.json by vLLM, silently changing the method's settings."""
        s = request.sampling
        body: dict[str, Any] = {
            "model": self.model, "max_tokens": request.max_tokens, "temperature": s.temperature, "top_p": s.top_p,
            "top_k": s.top_k if s.top_k else self.dialect.top_k_disabled(),
        }
        if s.seed is not None:
            body["seed"] = s.seed
        if s.stop:
            body["stop"] = list(s.stop)
        if self.stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        if self.dialect.vllm:
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

    # -- generation ---------------------------------------------------------------------------
    async def generate(self, request: GenerationRequest) -> Generation:
        start = time.perf_counter()
        await self.ready()  # the server's flavour decides how top-k is disabled
        completions = self.endpoint == "completions"
        if request.assistant_prefix_ids is not None and self.dialect.renders_chat_ids() and not request.tools:
            # Continue a chunk from exact token ids: the chat template's ids, then the carried ids.
            body = self._sampling_fields(request)
            body["prompt"] = [*await self._prompt_ids.render(request.messages), *request.assistant_prefix_ids]
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
        if gen.reasoning is None and not completions:
            if not self.dialect.think_opened and _closes_unopened_think(gen.text):
                # A reply that closes a think block it never opened: the chat template opens it, though the
                # server could not render the template for the probe (no tokenize endpoint). From now on,
                # a reply that never closes it is unfinished reasoning.
                logger.info("replies close a <think> the chat template opened; unclosed ones are unfinished")
                self.dialect.think_opened = True
            if self.dialect.think_opened:
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
                    return await stream_once(self.router, replica, path, body, request, completions, start)
                reply = await self.router.post_once(replica, path, body, root=False)
                return parse_reply(reply, time.perf_counter() - start, completions=completions)
            except Transient as exc:
                spent += exc.spent
                raise

        for _ in range(len(OPTIONAL_FIELDS) + 1):
            try:
                gen = await self.router.retrying(attempt, key=request.affinity, what=f"{path} {_tags(request)}")
            except BackendError as exc:
                if not isinstance(exc, BackendRequestError) or self._drop_refused_field(body, exc) is None:
                    exc.attempts, exc.discarded_tokens = tries, spent  # what the failure cost, for the usage
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

    def _with_reasoning_count(self, gen: Generation) -> Generation:
        """With token ids and a split-out reasoning, count the reasoning's ids (up to the think-close
        token), so its tail can be cut from the ids without a tokenize call."""
        close = self.dialect.think_close
        if gen.token_ids is None or gen.reasoning is None or gen.reasoning_tokens is not None:
            return gen
        if close is None or close not in gen.token_ids:
            return gen if gen.text else Generation(**{**gen.__dict__, "reasoning_tokens": len(gen.token_ids)})
        count = len(gen.token_ids) - 1 - gen.token_ids[::-1].index(close)
        return Generation(**{**gen.__dict__, "reasoning_tokens": count})


def _closes_unopened_think(text: str) -> bool:
    close = text.find("</think>")
    return close >= 0 and "<think>" not in text[:close]


def _tags(request: GenerationRequest) -> str:
    return " ".join(f"{k}={v}" for k, v in request.tags.items())
