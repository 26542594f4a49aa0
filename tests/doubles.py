"""A scripted backend for pinning engine rules. Real backends are tested against real models.

Its tokenizer maps one character to one token, so token-exact rules are visible in plain strings.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from markov_rsa.backends.base import BackendInfo, Generation, GenerationRequest, TokenizerKind
from markov_rsa.errors import BackendError

Responder = Callable[[GenerationRequest, int], "str | Generation | BackendError"]


@dataclass
class ScriptedBackend:
    responder: Responder
    delay: float = 0.0
    tokenizer: TokenizerKind = "exact"
    requests: list[GenerationRequest] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0
    cancelled: int = 0

    @property
    def info(self) -> BackendInfo:
        return BackendInfo(kind="scripted", model="scripted", tokenizer=self.tokenizer)

    async def ready(self) -> None:
        return None

    async def generate(self, request: GenerationRequest) -> Generation:
        number = len(self.requests)
        self.requests.append(request)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.delay:
                await asyncio.sleep(self.delay)
            else:
                await asyncio.sleep(0)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.in_flight -= 1
        out = self.responder(request, number)
        if isinstance(out, BaseException):
            raise out
        if isinstance(out, Generation):
            return out
        prompt_tokens = sum(len(m["content"]) for m in request.messages) + len(request.assistant_prefix)
        if len(out) > request.max_tokens:
            return Generation(out[: request.max_tokens], "length", request.max_tokens, prompt_tokens)
        return Generation(out, "stop", len(out), prompt_tokens)

    async def tokenize(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    async def detokenize(self, ids: Sequence[int]) -> str:
        return "".join(chr(i) for i in ids)

    async def aclose(self) -> None:
        return None


def prompt_of(request: GenerationRequest) -> str:
    return request.messages[-1]["content"]
