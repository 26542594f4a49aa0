"""Splitting a generation into reasoning and answer, and cutting tails on model tokens.

Servers report reasoning three ways: a separate ``reasoning_content``/``reasoning`` field (vLLM and
SGLang with a reasoning parser), ``<think>…</think>`` inline in the text, or only ``…</think>`` when
the chat template already opened the think block in the prompt (the backend then says so with
``Generation.think_opened``, so a reply cut off before ``</think>`` is known to be unfinished
reasoning). A model without a think block has one trace that is both its reasoning and its answer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from markov_rsa.backends.base import APPROX_CHARS_PER_TOKEN, Backend, Generation

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"


@dataclass(frozen=True)
class Split:
    reasoning: str
    answer: str
    #: The model closed its reasoning and produced an answer section (or, without a think block, stopped).
    finished: bool


def split_reasoning(gen: Generation) -> Split:
    stopped = gen.finish_reason == "stop"
    if gen.reasoning is not None:
        answer = gen.text.strip()
        return Split(gen.reasoning, gen.text, finished=stopped or bool(answer))
    text = gen.text
    close = text.rfind(THINK_CLOSE)
    if close >= 0:
        head = text[:close]
        opened = head.find(THINK_OPEN)
        reasoning = head[opened + len(THINK_OPEN):] if opened >= 0 else head
        return Split(reasoning.strip("\n"), text[close + len(THINK_CLOSE):].lstrip("\n"), finished=True)
    opened = text.find(THINK_OPEN)
    if opened >= 0:
        # Truncated inside its reasoning: there is no answer section yet.
        return Split(text[opened + len(THINK_OPEN):].lstrip("\n"), "", finished=False)
    if gen.think_opened and not stopped:
        # The template opened the think block and the model never closed it: all of it is reasoning.
        return Split(text, "", finished=False)
    # A model without a think block: one trace that is both reasoning and answer. Its reply counts
    # even when cut at the budget, since it has no reasoning section apart from the answer.
    return Split(text, text, finished=True)


def opens_think_by_template(text: str) -> bool:
    """Whether a reply closes a think block it never opened: the chat template opened it."""
    close = text.find(THINK_CLOSE)
    return close >= 0 and THINK_OPEN not in text[:close]


def carried_text(split: Split, source: str) -> str:
    """The part of a candidate that the next round sees, before it is cut to τ tokens."""
    if source == "answer":
        return split.answer or split.reasoning
    if source == "hybrid":
        return split.answer if split.finished and split.answer.strip() else split.reasoning
    if source == "full" and split.answer.strip() and split.reasoning.strip() and split.answer != split.reasoning:
        return f"{split.reasoning.rstrip()}\n\n{split.answer.lstrip()}"  # everything it wrote: τ cuts the end
    return split.reasoning or split.answer


async def last_tokens(
    backend: Backend, text: str, n: int, *, exact: bool, known_tokens: int | None = None,
    ids: Sequence[int] | None = None,
) -> tuple[str, int]:
    """The last ``n`` model tokens of ``text`` and how many tokens that is.

    With an exact tokenizer the cut is on token ids; text that already fits is returned unchanged so
    that no round trip through the tokenizer can alter it. ``known_tokens`` is the exact length of
    ``text`` when the caller has it (a whole completion's count from the server): text known to fit
    needs no tokenizer call at all. ``ids`` are ``text``'s own token ids when the server returned
    them: the cut then takes one detokenize call at most, and no tokenize call.
    """
    if n <= 0 or not text:
        return "", 0
    if ids is not None and exact:
        if len(ids) <= n:
            return text, len(ids)
        return (await backend.detokenize(ids[-n:])).lstrip("\ufffd"), n
    if known_tokens is not None and known_tokens <= n:
        return text, known_tokens
    if not exact:
        approx = -(-len(text) // APPROX_CHARS_PER_TOKEN)
        if approx <= n:
            return text, approx
        return text[-n * APPROX_CHARS_PER_TOKEN:], n
    ids = await backend.tokenize(text)
    if len(ids) <= n:
        return text, len(ids)
    tail = await backend.detokenize(ids[-n:])
    return tail.lstrip("\ufffd"), n

