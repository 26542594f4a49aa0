"""Reading a streamed (SSE) chat or text completion into one :class:`Generation`.

Servers differ in what a stream carries: vLLM and SGLang may split reasoning into
``reasoning_content`` (or ``reasoning``), vLLM returns generated token ids when asked
(``return_token_ids``), usage arrives in a final chunk (``stream_options.include_usage``) or on
every chunk, tool calls arrive as indexed fragments. Anything malformed is a :class:`MalformedReply`
(retried like a dropped connection), never a crash.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from markov_rsa.backends.base import APPROX_CHARS_PER_TOKEN, Generation


class MalformedReply(Exception):
    """The server's reply cannot be read; the request may succeed if sent again."""


def _int(value: Any) -> int | None:
    """A count from a usage object; anything that is not a non-negative integer is unknown."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int) and value >= 0:
        return value
    if isinstance(value, float) and value.is_integer() and value >= 0:
        return int(value)
    return None


@dataclass
class _ToolCall:
    id: str = ""
    name: str = ""
    arguments: list[str] = field(default_factory=list)


@dataclass
class StreamReader:
    """Accumulates a stream's chunks; :meth:`result` gives the generation once the stream ended."""

    completions: bool = False
    text: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    token_ids: list[int] | None = None
    finish_reason: str | None = None
    usage: dict[str, Any] = field(default_factory=dict)
    done: bool = False
    chunks: int = 0
    tool_calls: dict[int, _ToolCall] = field(default_factory=dict)
    _ids_ok: bool = True

    @property
    def tokens_so_far(self) -> int:
        """Generated tokens so far: the server's running count where it sends one, else exact ids,
        else one per content chunk (vLLM and llama.cpp stream one token per chunk)."""
        counted = _int(self.usage.get("completion_tokens"))
        if counted is not None:
            return counted
        if self.token_ids is not None:
            return len(self.token_ids)
        return self.chunks

    def feed_line(self, line: str) -> bool:
        """Take one SSE line; returns True when it carried generated content."""
        if not line.startswith("data:"):
            return False  # comments, event names and keep-alives
        payload = line[5:].strip()
        if payload == "[DONE]":
            self.done = True
            return False
        try:
            data = json.loads(payload)
        except (json.JSONDecodeError, RecursionError):  # nesting deeper than Python's stack: not a chunk
            raise MalformedReply("the server streamed a chunk that is not JSON") from None
        if not isinstance(data, dict):
            raise MalformedReply("the server streamed a chunk that is not an object")
        if "error" in data:
            error = data["error"]
            message = error.get("message") if isinstance(error, dict) else error
            raise MalformedReply(f"the server reported an error mid-stream: {str(message)[:200]}")
        usage = data.get("usage")
        if isinstance(usage, dict):
            self.usage = usage
        choices = data.get("choices")
        if choices is None or choices == []:
            return False  # a usage-only chunk
        if not isinstance(choices, list) or not isinstance(choices[0], dict):
            raise MalformedReply("the server streamed a choice that is not an object")
        return self._feed_choice(choices[0])

    def _feed_choice(self, choice: dict[str, Any]) -> bool:
        carried = False
        if self.completions:
            piece = choice.get("text")
            if isinstance(piece, str) and piece:
                self.text.append(piece)
                carried = True
        else:
            delta = choice.get("delta") or {}
            if not isinstance(delta, dict):
                raise MalformedReply("the server streamed a delta that is not an object")
            for key, sink in (("content", self.text), ("reasoning_content", self.reasoning),
                              ("reasoning", self.reasoning)):
                piece = delta.get(key)
                if isinstance(piece, str) and piece:
                    sink.append(piece)
                    carried = True
            if delta.get("tool_calls"):
                self._feed_tool_calls(delta["tool_calls"])
                carried = True
        ids = choice.get("token_ids")
        if ids is not None and self._ids_ok:
            if isinstance(ids, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
                self.token_ids = [*(self.token_ids or []), *ids]
            else:
                self._ids_ok, self.token_ids = False, None  # unreadable ids: fall back to the tokenizer
        if choice.get("finish_reason"):
            self.finish_reason = str(choice["finish_reason"])
        if carried:
            self.chunks += 1
        return carried

    def _feed_tool_calls(self, fragments: Any) -> None:
        if not isinstance(fragments, list):
            raise MalformedReply("the server streamed tool calls that are not a list")
        for fragment in fragments:
            if not isinstance(fragment, dict):
                raise MalformedReply("the server streamed a tool call that is not an object")
            index = fragment.get("index", len(self.tool_calls))
            call = self.tool_calls.setdefault(index if isinstance(index, int) else 0, _ToolCall())
            call.id = fragment.get("id") or call.id
            function = fragment.get("function") or {}
            if isinstance(function, dict):
                call.name = function.get("name") or call.name
                if isinstance(function.get("arguments"), str):
                    call.arguments.append(function["arguments"])

    def result(self, latency: float) -> Generation:
        """The finished generation; a stream that ended before its finish reason is malformed."""
        if self.finish_reason is None:
            raise MalformedReply("the stream ended before the generation finished")
        text, reasoning = "".join(self.text), "".join(self.reasoning) if self.reasoning else None
        finish = "tool_calls" if self.finish_reason == "function_call" else self.finish_reason
        completion = _int(self.usage.get("completion_tokens"))
        if completion is None:
            completion = len(self.token_ids) if self.token_ids is not None else \
                -(-len(text + (reasoning or "")) // APPROX_CHARS_PER_TOKEN)
        details = self.usage.get("completion_tokens_details")
        prompt_details = self.usage.get("prompt_tokens_details")
        calls = tuple(
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": "".join(c.arguments)}}
            for _, c in sorted(self.tool_calls.items())
        )
        return Generation(
            text=text,
            finish_reason=finish,
            completion_tokens=completion,
            prompt_tokens=_int(self.usage.get("prompt_tokens")) or 0,
            reasoning=reasoning,
            reasoning_tokens=_int(details.get("reasoning_tokens")) if isinstance(details, dict) else None,
            token_ids=tuple(self.token_ids) if self.token_ids is not None else None,
            latency=latency,
            cached_prompt_tokens=(_int(prompt_details.get("cached_tokens")) if isinstance(prompt_details, dict)
                                  else None),
            tool_calls=calls,
        )
