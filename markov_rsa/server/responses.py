"""The Responses API (``POST /v1/responses``) for RSA runs: what agent SDKs speak by default.

openai-agents, LangChain's ``use_responses_api=True`` and ``litellm.responses()`` send Responses
requests. An RSA Responses request (``extended_compute``, an ``rsa`` object or the proxy's fields,
as for chat) is read as the chat request it amounts to: ``instructions`` and the ``input`` items
become the conversation (messages, ``function_call`` items as the assistant's tool calls,
``function_call_output`` items as tool results; reasoning items are not carried), function tools
become chat tools, ``max_output_tokens`` the last stage's budget and ``text.format`` the
``response_format``. The run is the same (tool calls are voted as for chat); its reply comes back
as a Response object, or streamed as Responses events (``response.created`` ...
``response.completed``) after the run's progress comments. A server that stores nothing cannot
continue a stored response: ``previous_response_id`` is a 400.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

from markov_rsa.server.errors import RequestError
from markov_rsa.server.replies import Reply

#: Responses fields that mean the same in a chat request.
SAME = ("model", "temperature", "top_p", "stream", "tool_choice", "parallel_tool_calls", "seed", "stop", "top_k",
        "extended_compute", "rsa", "return_rsa_metadata", "metadata", "user", "store", "service_tier")


def _text_of(content: Any, where: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if not isinstance(content, list):
        raise RequestError(f"{where} must be a string or a list of content parts", where)
    parts = []
    for i, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in ("input_text", "output_text", "text"):
            raise RequestError(f"{where}[{i}]: RSA prompts take text parts only, got {kind!r}", f"{where}[{i}]")
        parts.append(str(part.get("text", "")))
    return "".join(parts)


def _messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    if body.get("instructions"):
        if not isinstance(body["instructions"], str):
            raise RequestError("instructions must be a string", "instructions")
        messages.append({"role": "system", "content": body["instructions"]})
    items = body.get("input")
    if isinstance(items, str):
        return [*messages, {"role": "user", "content": items}]
    if not isinstance(items, list) or not items:
        raise RequestError("input must be a string or a non-empty list of items", "input")
    for i, item in enumerate(items):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise RequestError(f"{where} must be an object", where)
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise RequestError(f"{where}.role must be user, system, developer or assistant", f"{where}.role")
            messages.append({"role": role, "content": _text_of(item.get("content"), f"{where}.content")})
        elif kind == "function_call":
            call = {"id": str(item.get("call_id") or item.get("id") or f"call_{i}"), "type": "function",
                    "function": {"name": str(item.get("name", "")), "arguments": str(item.get("arguments") or "{}")}}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant" and last.get("tool_calls") and not last["content"]:
                last["tool_calls"].append(call)  # parallel calls: one assistant turn
            else:
                messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            text = output if isinstance(output, str) else _text_of(output, f"{where}.output")
            messages.append({"role": "tool", "tool_call_id": str(item.get("call_id", "")), "content": text})
        elif kind == "reasoning":
            continue  # a previous turn's reasoning is not part of the problem
        else:
            raise RequestError(f"{where}.type {kind!r} cannot go into an RSA prompt (messages, function calls "
                               "and their outputs can)", f"{where}.type")
    return messages


def _tools(body: dict[str, Any]) -> list[dict[str, Any]] | None:
    tools = body.get("tools")
    if not tools:
        return None
    if not isinstance(tools, list):
        raise RequestError("tools must be a list", "tools")
    out = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise RequestError(f"tools[{i}]: RSA runs take function tools only", f"tools[{i}].type")
        function = {k: tool[k] for k in ("name", "description", "parameters", "strict") if tool.get(k) is not None}
        out.append({"type": "function", "function": function})
    return out


def chat_body(body: Any) -> dict[str, Any]:
    """The chat-completions request a Responses request amounts to (its RSA fields kept)."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    if body.get("previous_response_id"):
        raise RequestError("previous_response_id: this server stores no responses; send the whole conversation "
                           "as input", "previous_response_id")
    chat: dict[str, Any] = {k: v for k, v in body.items() if k in SAME and v is not None}
    for key, value in body.items():  # the reference proxy's fields and any other RSA field pass as they are
        if key not in chat and key not in ("input", "instructions", "tools", "max_output_tokens", "text",
                                           "reasoning", "include", "truncation", "background", "prompt"):
            chat[key] = value
    chat["messages"] = _messages(body)
    tools = _tools(body)
    if tools:
        chat["tools"] = tools
    choice = body.get("tool_choice")
    if isinstance(choice, dict) and choice.get("type") == "function":
        chat["tool_choice"] = {"type": "function", "function": {"name": choice.get("name")}}
    if body.get("max_output_tokens") is not None:
        chat["max_tokens"] = body["max_output_tokens"]
    fmt = (body.get("text") or {}).get("format") if isinstance(body.get("text"), dict) else None
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        chat["response_format"] = {"type": "json_schema", "json_schema": {
            k: fmt[k] for k in ("name", "schema", "strict", "description") if k in fmt}}
    elif isinstance(fmt, dict) and fmt.get("type") == "json_object":
        chat["response_format"] = {"type": "json_object"}
    return chat


class ResponsesShape:
    """A run's reply as a Response object, or as the Responses stream's events."""

    def __init__(self, body: dict[str, Any], model: str) -> None:
        self.request = body
        self.id = f"resp_{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model
        self.sequence = 0

    def _items(self, reply: Reply) -> list[dict[str, Any]]:
        message: dict[str, Any] = reply.choices[0]["message"] if reply.choices else {"content": ""}
        calls: list[dict[str, Any]] = message.get("tool_calls") or []
        if calls:
            return [{"type": "function_call", "id": f"fc_{uuid.uuid4().hex}", "call_id": c["id"],
                     "name": c["function"]["name"], "arguments": c["function"].get("arguments") or "{}",
                     "status": "completed"} for c in calls]
        return [{"type": "message", "id": f"msg_{uuid.uuid4().hex}", "status": "completed", "role": "assistant",
                 "content": [{"type": "output_text", "text": message.get("content") or "", "annotations": []}]}]

    def _response(self, status: str, output: list[dict[str, Any]], reply: Reply | None) -> dict[str, Any]:
        body: dict[str, Any] = {
            "id": self.id, "object": "response", "created_at": self.created, "status": status, "model": self.model,
            "output": output, "parallel_tool_calls": bool(self.request.get("parallel_tool_calls", True)),
            "tool_choice": self.request.get("tool_choice") or "auto", "tools": self.request.get("tools") or [],
            "error": None, "incomplete_details": None, "instructions": self.request.get("instructions"),
            "metadata": self.request.get("metadata") or {}, "temperature": self.request.get("temperature"),
            "top_p": self.request.get("top_p"), "max_output_tokens": self.request.get("max_output_tokens"),
            "text": self.request.get("text") or {"format": {"type": "text"}}, "truncation": "disabled",
            "usage": None,
        }
        if reply is not None:
            u = reply.usage
            reasoning = (u.get("completion_tokens_details") or {}).get("reasoning_tokens", 0)
            body["usage"] = {"input_tokens": u["prompt_tokens"], "output_tokens": u["completion_tokens"],
                             "total_tokens": u["total_tokens"], "input_tokens_details": {"cached_tokens": 0},
                             "output_tokens_details": {"reasoning_tokens": reasoning}}
            body.update(reply.extra)
        return body

    def body(self, reply: Reply) -> dict[str, Any]:
        return self._response("completed", self._items(reply), reply)

    def _event(self, kind: str, **fields: Any) -> str:
        self.sequence += 1
        data = {"type": kind, "sequence_number": self.sequence, **fields}
        return f"event: {kind}\ndata: {json.dumps(data)}\n\n"

    def chunks(self, reply: Reply, include_usage: bool) -> Iterator[str]:
        yield self._event("response.created", response=self._response("in_progress", [], None))
        yield self._event("response.in_progress", response=self._response("in_progress", [], None))
        items = self._items(reply)
        for index, item in enumerate(items):
            if item["type"] == "function_call":
                yield self._event("response.output_item.added", output_index=index,
                                  item={**item, "arguments": "", "status": "in_progress"})
                yield self._event("response.function_call_arguments.delta", output_index=index, item_id=item["id"],
                                  delta=item["arguments"])
                yield self._event("response.function_call_arguments.done", output_index=index, item_id=item["id"],
                                  arguments=item["arguments"])
            else:
                text = item["content"][0]["text"]
                part = {"type": "output_text", "text": "", "annotations": []}
                yield self._event("response.output_item.added", output_index=index,
                                  item={**item, "content": [], "status": "in_progress"})
                yield self._event("response.content_part.added", output_index=index, item_id=item["id"],
                                  content_index=0, part=part)
                yield self._event("response.output_text.delta", output_index=index, item_id=item["id"],
                                  content_index=0, delta=text, logprobs=[])
                yield self._event("response.output_text.done", output_index=index, item_id=item["id"],
                                  content_index=0, text=text, logprobs=[])
                yield self._event("response.content_part.done", output_index=index, item_id=item["id"],
                                  content_index=0, part={**part, "text": text})
            yield self._event("response.output_item.done", output_index=index, item=item)
        yield self._event("response.completed", response=self._response("completed", items, reply))

    def error_chunk(self, error: dict[str, Any]) -> str:
        detail = error.get("error", {})
        return self._event("error", code=detail.get("code") or detail.get("type"), message=detail.get("message"),
                           param=detail.get("param"))
