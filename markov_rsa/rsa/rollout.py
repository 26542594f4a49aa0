"""One rollout: a single generation, or a Delethink-style sequence of fixed-length chunks.

A chunked rollout never lets its prompt grow: chunk j+1 sees the problem, the first ``keep_head``
tokens the rollout generated and the last ``carryover`` tokens of chunk j, nothing else. It ends
when the model stops, the chunk limit is reached or the budget is spent.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from markov_rsa.backends.base import (
    APPROX_CHARS_PER_TOKEN,
    Backend,
    Generation,
    GenerationRequest,
    Message,
    SamplingParams,
)
from markov_rsa.rsa.config import RSAConfig
from markov_rsa.rsa.result import Usage


@dataclass(frozen=True)
class RolloutOutput:
    generation: Generation
    usage: Usage
    chunks: int
    seconds: float


def _usage(gen: Generation) -> Usage:
    return Usage(gen.prompt_tokens, gen.completion_tokens, gen.reasoning_tokens or 0, 1)


def _raw_output(gen: Generation) -> str:
    """A chunk's output as one text, re-joining a reasoning field the server split out."""
    if gen.reasoning is None:
        return gen.text
    if gen.text or gen.finish_reason == "stop":
        return f"{gen.reasoning}</think>{gen.text}"
    return gen.reasoning


async def rollout(
    backend: Backend,
    messages: tuple[Message, ...],
    config: RSAConfig,
    sampling_for_chunk: Callable[[int], SamplingParams],
    *,
    exact_tokens: bool,
    tags: dict[str, int] | None = None,
) -> RolloutOutput:
    start = time.perf_counter()
    if not config.chunked:
        request = GenerationRequest(messages, config.budget, sampling_for_chunk(0), tags={**(tags or {}), "chunk": 0})
        gen = await backend.generate(request)
        return RolloutOutput(gen, _usage(gen), 1, time.perf_counter() - start)

    assert config.chunk_size is not None
    carry = config.carryover or 0
    remaining = config.budget
    usage = Usage()
    outputs: list[Generation] = []
    head_ids: list[int] = []
    head_text = ""
    prefix = ""
    prefix_ids: tuple[int, ...] = ()
    for chunk in range(config.effective_max_chunks):
        request = GenerationRequest(
            messages,
            min(config.chunk_size, remaining),
            sampling_for_chunk(chunk),
            assistant_prefix=prefix,
            assistant_prefix_ids=prefix_ids if exact_tokens else None,
            tags={**(tags or {}), "chunk": chunk},
        )
        gen = await backend.generate(request)
        outputs.append(gen)
        usage.add(_usage(gen))
        remaining -= gen.completion_tokens
        if gen.finish_reason != "length" or remaining <= 0 or chunk + 1 >= config.effective_max_chunks:
            break
        raw = _raw_output(gen)
        ids = list(gen.token_ids) if gen.token_ids is not None and exact_tokens else None
        if ids is None:
            ids = await backend.tokenize(raw) if exact_tokens else []
        if chunk == 0 and config.keep_head:
            head_ids = ids[: config.keep_head]
            head_text = raw[: config.keep_head * APPROX_CHARS_PER_TOKEN]
        if exact_tokens:
            prefix_ids = tuple(head_ids + (ids[-carry:] if carry else []))
            prefix = await backend.detokenize(prefix_ids) if prefix_ids else ""
        else:
            prefix = head_text + (raw[-carry * APPROX_CHARS_PER_TOKEN:] if carry else "")

    last = outputs[-1]
    if len(outputs) == 1:
        combined = last
    elif any(g.reasoning is not None for g in outputs):
        combined = Generation(
            text=last.text,
            reasoning="".join(g.reasoning or "" for g in outputs),
            finish_reason=last.finish_reason,
            completion_tokens=usage.completion_tokens,
            prompt_tokens=usage.prompt_tokens,
        )
    else:
        combined = Generation(
            text="".join(g.text for g in outputs),
            finish_reason=last.finish_reason,
            completion_tokens=usage.completion_tokens,
            prompt_tokens=usage.prompt_tokens,
        )
    return RolloutOutput(combined, usage, len(outputs), time.perf_counter() - start)
