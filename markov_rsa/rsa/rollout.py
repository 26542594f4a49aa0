"""One rollout: a single generation, or a Delethink-style sequence of fixed-length chunks.

A chunked rollout never lets its prompt grow: chunk j+1 sees the problem, the first ``keep_head``
tokens the rollout generated and the last ``carryover`` tokens of chunk j, nothing else. It ends
when the model stops, the chunk limit is reached or the budget is spent. With
``chunk_mode="context"`` C is a chunk's context as in Delethink's reference code: the first chunk
generates C tokens, later ones C − m.

Chunks are joined as raw text (reasoning, ``</think>``, answer) before the reasoning is split
again, so an answer that a reasoning-parser server split across a chunk boundary survives.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from markov_rsa.backends.base import (
    APPROX_CHARS_PER_TOKEN,
    Backend,
    Generation,
    GenerationRequest,
    Message,
    SamplingParams,
)
from markov_rsa.errors import BackendError
from markov_rsa.rsa.config import RSAConfig
from markov_rsa.rsa.result import Usage
from markov_rsa.rsa.tails import THINK_CLOSE

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RolloutOutput:
    generation: Generation
    usage: Usage
    chunks: int
    seconds: float
    #: The tokenizer failed between two chunks, so the carry-over after it was cut on an approximation.
    approximate: bool = False


def _usage(gen: Generation) -> Usage:
    return Usage(gen.prompt_tokens, gen.completion_tokens, gen.reasoning_tokens or 0, 1, gen.discarded_tokens,
                 gen.cached_prompt_tokens or 0)


def _raw_output(gen: Generation) -> str:
    """A chunk's output as one text, re-joining a reasoning field the server split out."""
    if gen.reasoning is None:
        return gen.text
    if gen.text or gen.finish_reason == "stop":
        return f"{gen.reasoning}{THINK_CLOSE}{gen.text}"
    return gen.reasoning


async def rollout(
    backend: Backend,
    messages: tuple[Message, ...],
    config: RSAConfig,
    sampling_for_chunk: Callable[[int], SamplingParams],
    *,
    exact_tokens: bool,
    budget: int | None = None,
    tags: dict[str, int] | None = None,
    affinity: str | None = None,
    on_progress: Callable[[int], None] | None = None,
    options: Mapping[str, Any] | None = None,
) -> RolloutOutput:
    """One rollout of at most ``budget`` new tokens (default: the config's β). ``on_progress`` hears the
    rollout's tokens so far while its generations stream."""
    start = time.perf_counter()
    budget = config.budget if budget is None else budget
    if not config.chunked:
        request = GenerationRequest(messages, budget, sampling_for_chunk(0), tags={**(tags or {}), "chunk": 0},
                                    affinity=affinity, on_progress=on_progress, **(options or {}))
        gen = await backend.generate(request)
        return RolloutOutput(gen, _usage(gen), 1, time.perf_counter() - start)

    assert config.chunk_size is not None
    carry = config.carryover or 0
    remaining = budget
    usage = Usage()
    outputs: list[Generation] = []
    head_ids: list[int] = []
    head_text = ""
    prefix = ""
    prefix_ids: tuple[int, ...] = ()
    approximate = False
    for chunk in range(config.effective_max_chunks):
        size = config.chunk_size - carry if chunk and config.chunk_mode == "context" else config.chunk_size
        request = GenerationRequest(
            messages,
            min(size, remaining),
            sampling_for_chunk(chunk),
            assistant_prefix=prefix,
            assistant_prefix_ids=prefix_ids if exact_tokens and chunk else None,
            tags={**(tags or {}), "chunk": chunk},
            affinity=affinity,
            on_progress=None if on_progress is None else _offset(on_progress, usage.generated_tokens),
            **(options or {}),
        )
        gen = await backend.generate(request)
        outputs.append(gen)
        usage.add(_usage(gen))
        remaining -= gen.completion_tokens
        if gen.finish_reason != "length" or remaining <= 0 or chunk + 1 >= config.effective_max_chunks:
            break
        raw = _raw_output(gen)
        if chunk == 0 and config.keep_head:
            head_text = raw[: config.keep_head * APPROX_CHARS_PER_TOKEN]
        if exact_tokens:
            try:
                ids = list(gen.token_ids) if gen.token_ids is not None else await backend.tokenize(raw)
                if chunk == 0 and config.keep_head:
                    head_ids = ids[: config.keep_head]
                prefix_ids = tuple(head_ids + (ids[-carry:] if carry else []))
                prefix = await backend.detokenize(prefix_ids) if prefix_ids else ""
                continue
            except BackendError as exc:  # as for tails: this rollout goes on with an approximate carry-over
                logger.warning("cutting chunk %d's carry-over failed (%s); carrying an approximate one", chunk, exc)
                exact_tokens, approximate, prefix_ids = False, True, ()
        prefix = head_text + (raw[-carry * APPROX_CHARS_PER_TOKEN:] if carry else "")

    return RolloutOutput(combine_chunks(outputs), usage, len(outputs), time.perf_counter() - start, approximate)


def _offset(callback: Callable[[int], None], before: int) -> Callable[[int], None]:
    return lambda tokens: callback(before + tokens)


def combine_chunks(outputs: list[Generation]) -> Generation:
    """One generation from a rollout's chunks, as if the model had written it in one go."""
    last = outputs[-1]
    if len(outputs) == 1:
        return last
    raw = "".join(g.text if g.reasoning is None else g.reasoning + (THINK_CLOSE + g.text if g.text else "")
                  for g in outputs)
    completion = sum(g.completion_tokens for g in outputs)
    prompt = sum(g.prompt_tokens for g in outputs)
    if not any(g.reasoning is not None for g in outputs):
        return Generation(text=raw, finish_reason=last.finish_reason, completion_tokens=completion,
                          prompt_tokens=prompt, think_opened=outputs[0].think_opened)
    # The server splits reasoning out: re-split the joined text where the model closed its reasoning.
    close = raw.find(THINK_CLOSE)
    reasoning, text = (raw[:close], raw[close + len(THINK_CLOSE):]) if close >= 0 else (raw, "")
    return Generation(text=text, reasoning=reasoning, finish_reason=last.finish_reason,
                      completion_tokens=completion, prompt_tokens=prompt)
