"""A run's result in chat-completion terms: the reply body, streamed chunks and RSA metadata."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from markov_rsa.rsa.events import Event
from markov_rsa.rsa.result import Candidate, RSAResult
from markov_rsa.server.privacy import public_reason


@dataclass
class Reply:
    """What a run produced, in chat-completion terms."""

    choices: list[dict[str, Any]]
    usage: dict[str, Any]
    extra: dict[str, Any]


def usage_body(prompt: int, completion: int, reasoning: int) -> dict[str, Any]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "completion_tokens_details": {"reasoning_tokens": reasoning}}


def message(text: str, reasoning: str | None, tool_calls: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """A chat message; ``reasoning_content`` only when the model reasoned apart from its answer (a model
    without a think block has one trace, which the engine reports as both); tool calls as OpenAI has them."""
    body: dict[str, Any] = {"role": "assistant", "content": text or (None if tool_calls else "")}
    if reasoning and reasoning != text:
        body["reasoning_content"] = reasoning
    if tool_calls:
        body["tool_calls"] = [{"id": c.get("id") or f"call_{i}", "type": "function", "function": c.get("function")}
                              for i, c in enumerate(tool_calls)]
    return body


def _finish(candidate: Candidate | None) -> str:
    if candidate is not None and candidate.tool_calls:
        return "tool_calls"
    return "length" if candidate is not None and candidate.finish_reason == "length" else "stop"


def rsa_metadata(result: RSAResult) -> dict[str, Any]:
    return {
        "config": result.config.to_dict(),
        "seed": result.seed,
        "stop_reason": result.stop_reason,
        "consensus": result.consensus,
        "selection": result.selection,
        "selected": list(result.selected) if result.selected else None,
        "votes": result.votes,
        "tails_approximate": result.tails_approximate,
        "prompts": result.prompts,
        "sampling": result.sampling,
        "rounds": [
            {
                "index": r.index, "kind": r.kind, "seconds": round(r.seconds, 3),
                "usage": {"prompt_tokens": r.usage.prompt_tokens, "completion_tokens": r.usage.completion_tokens},
                "candidates": [
                    {"index": c.index, "parents": c.parents, "answer": c.answer, "finish_reason": c.finish_reason,
                     "completion_tokens": c.usage.completion_tokens, "tail_tokens": c.tail_tokens,
                     "error": public_reason(c.error)}
                    for c in r.candidates
                ],
            }
            for r in result.rounds
        ],
    }


def reply_from_result(result: RSAResult, metadata: bool, all_final: bool = False) -> Reply:
    """The reply: the chosen answer, or with ``all_final`` (the reference proxy's bodies) every final
    aggregation as a choice, the chosen one first."""
    final = result.rounds[-1] if result.rounds and result.rounds[-1].kind == "final" else None
    if result.config.final == "population":
        choices = [{"index": i, "message": message(c.text, c.reasoning, c.tool_calls), "finish_reason": _finish(c)}
                   for i, c in enumerate(result.population)]
    elif all_final and final is not None and result.selection == "final_aggregate":
        ok = [c for c in final.candidates if c.ok]
        ok.sort(key=lambda c: (result.selected != (c.round, c.index), c.index))
        choices = [{"index": i, "message": message(c.text, c.reasoning, c.tool_calls), "finish_reason": _finish(c)}
                   for i, c in enumerate(ok)]
    else:
        chosen = next((c for r in result.rounds for c in r.candidates if result.selected == (c.round, c.index)),
                      None)
        calls = chosen.tool_calls if chosen is not None else None
        choices = [{"index": 0, "message": message(result.text, result.reasoning, calls),
                    "finish_reason": _finish(chosen)}]
    u = result.usage
    return Reply(choices, usage_body(u.prompt_tokens, u.completion_tokens + u.discarded_tokens, u.reasoning_tokens),
                 {"rsa_metadata": rsa_metadata(result)} if metadata else {})


def progress_comment(event: Event) -> str:
    """A progress event as an SSE comment line, which every SSE client (OpenAI's included) skips."""
    data = event.to_dict()
    if data.get("error"):
        data["error"] = public_reason(data["error"])  # the upstream's text goes to the log, not the client
    if data.get("type") == "round_finished":
        data = {k: data[k] for k in ("type", "round", "round_kind", "majority", "agreement", "seconds", "failed")}
    return f": rsa {json.dumps(data)}\n\n"


def reply_chunks(reply: Reply, envelope: dict[str, Any], include_usage: bool) -> Iterator[str]:
    """The reply as standard chat-completion chunks: role, reasoning, content or tool calls, finish."""

    def chunk(choices: list[dict[str, Any]], **extra: Any) -> str:
        return f"data: {json.dumps({**envelope, 'choices': choices, **extra})}\n\n"

    for choice in reply.choices:
        index, body = choice["index"], choice["message"]
        yield chunk([{"index": index, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
        if body.get("reasoning_content"):
            yield chunk([{"index": index, "delta": {"reasoning_content": body["reasoning_content"]},
                          "finish_reason": None}])
        if body.get("content"):
            yield chunk([{"index": index, "delta": {"content": body["content"]}, "finish_reason": None}])
        for i, call in enumerate(body.get("tool_calls") or []):
            yield chunk([{"index": index, "delta": {"tool_calls": [{"index": i, **call}]}, "finish_reason": None}])
        yield chunk([{"index": index, "delta": {}, "finish_reason": choice["finish_reason"]}], **reply.extra)
    if include_usage:
        yield chunk([], usage=reply.usage)
    yield "data: [DONE]\n\n"
