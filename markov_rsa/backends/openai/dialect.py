"""What the server is and what it can do, learnt once before the first generation.

The tokenize endpoints differ by server (vLLM and SGLang ``/tokenize``, llama-cpp-python
``/extras/tokenize``, llama.cpp ``/tokenize`` with other field names) and also tell which server it
is: top-k is disabled differently on llama.cpp. A Hugging Face tokenizer, when one is named, cuts
tails locally instead. The probe also reads whether the chat template opens a think block at the
assistant's turn and which token closes one.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from markov_rsa.backends.base import TokenizerKind
from markov_rsa.backends.openai.routing import Router
from markov_rsa.errors import BackendRequestError, BackendUnavailableError, MissingDependencyError

#: Text tokenized and detokenized to check that a server's endpoints round-trip.
PROBE_TEXT = "Markovian tails: 12 + 30 = 42."


@dataclass
class TokenizerRoute:
    tokenize: str
    detokenize: str
    style: Literal["vllm", "llamacpp-python", "llamacpp"]
    strip_prefix: tuple[int, ...] = ()


@dataclass
class Dialect:
    """The server's tokenizer endpoints (or a local Hugging Face tokenizer) and template facts."""

    router: Router
    model: str
    tokenizer: str | None = None
    route: TokenizerRoute | None = None
    hf_tokenizer: Any = field(default=None, repr=False)
    kind: TokenizerKind | None = None
    #: The id of a ``</think>`` that is one special token, where it is.
    think_close: int | None = None
    #: The chat template opens a think block at the assistant's turn.
    think_opened: bool = False
    _lock: asyncio.Lock | None = field(default=None, repr=False)

    async def ready(self) -> None:
        if self.kind is not None:
            return
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self.kind is None:
                self.kind = await self._probe()

    @property
    def llamacpp(self) -> bool:
        return self.route is not None and self.route.style.startswith("llamacpp")

    @property
    def vllm(self) -> bool:
        return self.route is not None and self.route.style == "vllm"

    def top_k_disabled(self) -> int:
        """Top-k off, in the form the server accepts: -1 for vLLM and SGLang, 0 for llama.cpp."""
        return 0 if self.llamacpp else -1

    def renders_chat_ids(self) -> bool:
        """Whether chat prompts can be rendered to exact token ids: a Hugging Face tokenizer, a server
        whose tokenize endpoint applies the chat template (vLLM, SGLang), or llama.cpp's server
        (/apply-template, then /tokenize)."""
        return self.hf_tokenizer is not None or (self.route is not None and self.route.style in ("vllm", "llamacpp"))

    async def _probe(self) -> TokenizerKind:
        """Find the server's tokenize endpoints, then load a Hugging Face tokenizer if one was named."""
        served = await self._probe_routes()
        if self.tokenizer:
            try:
                from transformers import AutoTokenizer
            except ImportError:
                raise MissingDependencyError(
                    "tokenizer: a Hugging Face tokenizer needs transformers: pip install 'markov-rsa[local]'"
                ) from None
            self.hf_tokenizer = await asyncio.to_thread(AutoTokenizer.from_pretrained, self.tokenizer)
            served = "exact"
        with contextlib.suppress(BackendUnavailableError, BackendRequestError, KeyError, TypeError, ValueError):
            self.think_opened = await self._template_opens_think()
        if served == "exact":
            with contextlib.suppress(BackendUnavailableError, BackendRequestError, KeyError, TypeError, ValueError):
                close = (list(self.hf_tokenizer.encode("</think>", add_special_tokens=False))
                         if self.hf_tokenizer is not None else await self.tokenize_remote("</think>"))
                self.think_close = close[0] if len(close) == 1 else None  # a special token of its own
        return served

    async def _template_opens_think(self) -> bool:
        """Whether the served chat template opens a think block at the assistant's turn (so a reply that
        never closes it is unfinished reasoning). Read from the rendered template where the server or a
        Hugging Face tokenizer can render it; otherwise assumed not."""
        sample = [{"role": "user", "content": "1+1?"}]
        if self.hf_tokenizer is not None:
            rendered = str(self.hf_tokenizer.apply_chat_template(sample, add_generation_prompt=True, tokenize=False))
        elif self.route is not None and self.route.style == "llamacpp":
            reply = await self.router.call("/apply-template", {"messages": sample}, root=True, attempts=1)
            rendered = str(reply["prompt"])
        elif self.route is not None and self.route.style == "vllm":
            data = await self.router.call(self.route.tokenize, {"model": self.model, "messages": sample,
                                                                "add_generation_prompt": True}, root=True, attempts=1)
            rendered = await self.detokenize_remote(token_list(data, self.route.tokenize)[-8:])
        else:
            return False
        return rendered.rstrip().endswith("<think>")

    async def _probe_routes(self) -> TokenizerKind:
        routes = (
            TokenizerRoute("/tokenize", "/detokenize", "vllm"),
            TokenizerRoute("/extras/tokenize", "/extras/detokenize", "llamacpp-python"),
            TokenizerRoute("/tokenize", "/detokenize", "llamacpp"),
        )
        unreachable: BackendUnavailableError | None = None
        answered = False
        for route in routes:
            try:
                self.route = route
                empty = await self.tokenize_remote("")
                route.strip_prefix = tuple(empty)
                ids = await self.tokenize_remote(PROBE_TEXT)
                if ids and (await self.detokenize_remote(ids)).strip() == PROBE_TEXT:
                    return "exact"
                answered = True
            except BackendUnavailableError as exc:
                unreachable = exc
            except (BackendRequestError, KeyError, TypeError, ValueError):
                answered = True  # the server answered: it just has no such endpoint
        self.route = None
        if unreachable is not None and not answered:
            urls = ", ".join(r.url for r in self.router.pool.replicas)
            raise BackendUnavailableError(f"cannot reach {urls}; is the server running? ({unreachable})")
        return "approximate"

    async def tokenize_remote(self, text: str) -> list[int]:
        route = self.route
        assert route is not None
        if route.style == "vllm":
            body: dict[str, Any] = {"model": self.model, "prompt": text, "add_special_tokens": False}
        elif route.style == "llamacpp-python":
            body = {"model": self.model, "input": text}
        else:
            body = {"content": text, "add_special": False}
        data = await self.router.call(route.tokenize, body, root=True, attempts=2)
        ids = token_list(data, route.tokenize)
        prefix = list(route.strip_prefix)
        return ids[len(prefix):] if prefix and ids[: len(prefix)] == prefix else ids

    async def detokenize_remote(self, ids: Sequence[int]) -> str:
        route = self.route
        assert route is not None
        body: dict[str, Any] = {"tokens": list(ids)}
        if route.style != "llamacpp":
            body["model"] = self.model
        data = await self.router.call(route.detokenize, body, root=True, attempts=2)
        text = next((data[k] for k in ("prompt", "text", "content") if isinstance(data, dict) and k in data), None)
        if not isinstance(text, str):
            raise BackendRequestError(f"{route.detokenize}: the server's reply holds no text ({_shape(data)})")
        return text

    async def tokenize(self, text: str) -> list[int]:
        await self.ready()
        if self.hf_tokenizer is not None:
            return list(self.hf_tokenizer.encode(text, add_special_tokens=False))
        if self.route is None:
            raise BackendRequestError("tokenize: this endpoint has no tokenizer; pass tokenizer= a Hugging Face name")
        return await self.tokenize_remote(text)

    async def detokenize(self, ids: Sequence[int]) -> str:
        await self.ready()
        if self.hf_tokenizer is not None:
            return str(self.hf_tokenizer.decode(list(ids), skip_special_tokens=False))
        if self.route is None:
            raise BackendRequestError("detokenize: this endpoint has no tokenizer; pass tokenizer= a Hugging Face name")
        # A cut can land inside a multi-byte character, which some servers cannot decode: drop a token.
        for skip in range(4):
            try:
                return await self.detokenize_remote(ids[skip:])
            except BackendUnavailableError:
                if skip == 3 or len(ids) <= skip + 1:
                    raise
        raise AssertionError("unreachable")


def _shape(data: Any) -> str:
    return f"keys {sorted(data)[:5]}" if isinstance(data, dict) else type(data).__name__


def token_list(data: Any, path: str) -> list[int]:
    """The token ids of a tokenize reply; any other reply (``{"detail": ...}``, ``[]``, ids that are not
    integers) is a :class:`BackendRequestError` that fails the one tail or prompt that asked, not the run."""
    tokens = data.get("tokens") if isinstance(data, dict) else None
    if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
        raise BackendRequestError(f"{path}: the server's reply holds no token list ({_shape(data)})")
    return list(tokens)
