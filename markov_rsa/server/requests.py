"""Reading a chat-completions request: pass-through or RSA, and what each field means for RSA.

The policy follows vLLM's server: accept what can be honoured, log what is ignored, and refuse (a
400 naming the field) only what cannot be honoured. A request without ``extended_compute``,
``rsa_*`` fields or an ``rsa`` object passes through untouched. For RSA requests:

- the conversation is the problem: system messages, earlier turns (tool calls and results
  included) and multi-part text are kept in every candidate's prompt;
- ``max_tokens``/``max_completion_tokens`` set the last stage's budget, ``stop``, ``seed``,
  ``temperature``, ``top_p``, ``top_k`` apply to every rollout, ``tools``/``tool_choice`` make tools
  available to every rollout, and ``response_format`` goes to every rollout as it is;
- ``n`` > 1, ``logprobs`` and ``top_logprobs`` cannot be honoured by a vote over a population;
- anything else (``store``, ``metadata``, ``user``, ``service_tier``, penalties...) is accepted and
  logged as ignored.

The reference proxy's fields (``rsa_n``...) run what the proxy runs (:mod:`~markov_rsa.server.proxy`).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from typing import Any

from markov_rsa.backends.base import GenerationRequest, Message, SamplingParams
from markov_rsa.errors import ConfigError
from markov_rsa.rsa.config import RSAConfig
from markov_rsa.server.errors import RequestError
from markov_rsa.server.proxy import PROXY_NAMES, ProxyPlan, proxy_plan
from markov_rsa.server.settings import ServerLimits, ServerSettings

logger = logging.getLogger("markov_rsa.server")

SAMPLING_FIELDS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "seed": "seed"}
#: Fields an RSA request passes to every rollout as they are.
FORWARDED = ("response_format",)
#: Fields an RSA request cannot honour, and why.
REFUSED = {
    "logprobs": "RSA returns a voted answer, not one sequence's token log-probabilities",
    "top_logprobs": "RSA returns a voted answer, not one sequence's token log-probabilities",
}
OURS = {"extended_compute", "return_rsa_metadata", "rsa", *PROXY_NAMES}
HANDLED = {"model", "messages", "stream", "stream_options", "max_tokens", "max_completion_tokens", "n", "stop",
           "tools", "tool_choice", *SAMPLING_FIELDS, *FORWARDED, *REFUSED, *OURS}


@dataclass(frozen=True)
class ParsedRequest:
    body: dict[str, Any]
    stream: bool
    include_usage: bool
    metadata: bool
    #: None: pass straight through.
    config: RSAConfig | None = None
    #: The RSA problem (the last user message's text), what precedes it, and what follows it (an agent's
    #: tool calls and their results).
    problem: str = ""
    context: tuple[Message, ...] = ()
    trailing: tuple[Message, ...] = ()
    tools: tuple[dict[str, Any], ...] = ()
    tool_choice: Any = None
    extra: dict[str, Any] = field(default_factory=dict)
    ignored: tuple[str, ...] = ()
    #: Every final aggregation comes back as a choice (the reference proxy's bodies).
    all_final: bool = False


def reject_constant(name: str) -> Any:
    """``json.loads`` hook: NaN and infinities are not JSON numbers a request may carry."""
    raise RequestError(f"the request body holds {name}, which is not a valid JSON number")


def finite_float(text: str) -> float:
    """``json.loads`` hook: a number too large for a float (``1e400``) is refused, not read as infinity."""
    value = float(text)
    if not math.isfinite(value):
        raise RequestError(f"the request body holds {text}, which is too large a number")
    return value


def _number(body: dict[str, Any], name: str, kind: type, *, minimum: float | None = None) -> Any:
    value = body.get(name)
    if value is None:
        return None
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) if kind is float else (
        isinstance(value, int) and not isinstance(value, bool))
    if not ok or (isinstance(value, float) and not math.isfinite(value)):
        raise RequestError(f"{name} must be {'a number' if kind is float else 'an integer'}, got {value!r}", name)
    if minimum is not None and value < minimum:
        raise RequestError(f"{name} must be at least {minimum}, got {value!r}", name)
    return value


def _text(content: Any, where: str) -> str:
    """A message's text: a string, or its text parts joined (other parts cannot go into RSA prompts)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for i, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type", "text") != "text":
                raise RequestError(f"{where}[{i}]: RSA prompts take text parts only", f"{where}[{i}]")
            parts.append(str(part.get("text", "")))
        return "".join(parts)
    raise RequestError(f"{where} must be a string or a list of text parts", where)


def _messages(raw: Any, limits: ServerLimits) -> list[Message]:
    if not isinstance(raw, list) or not raw:
        raise RequestError("messages must be a non-empty list", "messages")
    if len(raw) > limits.max_messages:
        raise RequestError(f"messages: at most {limits.max_messages} messages", "messages")
    clean: list[Message] = []
    for i, message in enumerate(raw):
        if not isinstance(message, dict) or message.get("role") not in ("system", "developer", "user", "assistant",
                                                                         "tool"):
            raise RequestError(f"messages[{i}] needs a role of system, developer, user, assistant or tool",
                               f"messages[{i}].role")
        kept: Message = {"role": message["role"], "content": _text(message.get("content"), f"messages[{i}].content")}
        for key in ("name", "tool_calls", "tool_call_id"):
            if message.get(key) is not None:
                kept[key] = message[key]
        clean.append(kept)
    if not any(m["role"] == "user" for m in clean):
        raise RequestError("messages must contain a user message", "messages")
    return clean


def parse_request(body: Any, settings: ServerSettings) -> ParsedRequest:
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    for flag in ("stream", "extended_compute", "return_rsa_metadata"):
        if flag in body and not isinstance(body[flag], bool):
            raise RequestError(f"{flag} must be true or false", flag)
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise RequestError("stream_options must be an object", "stream_options")
    rsa_object = body.get("rsa")
    if rsa_object is not None and not isinstance(rsa_object, dict):
        raise RequestError("rsa must be an object of RSA settings", "rsa")
    plan = proxy_plan(body)
    common: dict[str, Any] = {"body": body, "stream": bool(body.get("stream")),
              "include_usage": bool(stream_options.get("include_usage")),
              "metadata": bool(body.get("return_rsa_metadata")) or bool(plan and plan.metadata)}
    if plan is not None and plan.plain and not rsa_object and not body.get("extended_compute"):
        # The proxy's rsa_t <= 0: one plain request with the client's own fields, RSA fields removed.
        common["body"] = {k: v for k, v in body.items() if k not in PROXY_NAMES and k != "return_rsa_metadata"}
        plan = None
        if not isinstance(body.get("messages"), list) or not body["messages"]:
            raise RequestError("messages must be a non-empty list", "messages")
        return ParsedRequest(**common)
    if not (body.get("extended_compute") or plan or rsa_object):
        if not isinstance(body.get("messages"), list) or not body["messages"]:
            raise RequestError("messages must be a non-empty list", "messages")
        return ParsedRequest(**common)
    return _rsa_request(body, settings, plan, rsa_object or {}, common)


def _generation_fields(body: dict[str, Any]) -> tuple[tuple[str, ...] | None, int | None, list[dict[str, Any]]]:
    """The fields of a chat request that shape each generation, checked: stop sequences, max tokens and
    tools (sampling fields are checked too, and read where they are used)."""
    stop = body.get("stop")
    if stop is not None and not (isinstance(stop, str) or (isinstance(stop, list)
                                                           and all(isinstance(s, str) for s in stop))):
        raise RequestError("stop must be a string or a list of strings", "stop")
    for name, kind in (("temperature", float), ("top_p", float), ("top_k", int), ("seed", int)):
        _number(body, name, kind, minimum=0)
    max_tokens = _number(body, "max_completion_tokens", int, minimum=1) or _number(body, "max_tokens", int, minimum=1)
    tools = body.get("tools") or []
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise RequestError("tools must be a list of tool objects", "tools")
    stops = None if stop is None else (stop,) if isinstance(stop, str) else tuple(stop)
    return stops, max_tokens, tools


def plain_request(body: dict[str, Any], settings: ServerSettings) -> GenerationRequest:
    """A pass-through request as one generation, for a backend without an upstream to relay to."""
    messages = _messages(body.get("messages"), settings.limits)
    stop, max_tokens, tools = _generation_fields(body)
    sampling = SamplingParams(
        temperature=float(body.get("temperature", 1.0)), top_p=float(body.get("top_p", 1.0)),
        top_k=body.get("top_k") or None, seed=body.get("seed"), stop=stop or ())
    return GenerationRequest(tuple(messages), max_tokens or settings.config.last_stage_budget, sampling,
                             tools=tuple(tools))


def _rsa_request(body: dict[str, Any], settings: ServerSettings, plan: ProxyPlan | None,
                 rsa_object: dict[str, Any], common: dict[str, Any]) -> ParsedRequest:
    messages = _messages(body.get("messages"), settings.limits)
    for name, why in REFUSED.items():
        if body.get(name) not in (None, False, 0):
            raise RequestError(f"{name}: not supported with RSA ({why})", name)
    n = _number(body, "n", int, minimum=1)
    if n not in (None, 1) and plan is None:
        raise RequestError("n: only n=1 is supported with RSA (rsa.final='population' returns the whole "
                           "population)", "n")
    stop, max_tokens, tools = _generation_fields(body)

    changes: dict[str, Any] = {}
    origin: dict[str, str] = {}
    base = settings.config.to_dict()
    if plan is not None and not plan.plain:
        # The proxy's defaults, not this server's preset: only the task and the run limits are the operator's.
        base = {**RSAConfig(task=settings.config.task).to_dict(), "token_budget": settings.config.token_budget,
                "time_limit": settings.config.time_limit}
        changes.update(plan.changes)
        origin.update(plan.origin)
    for name, target in SAMPLING_FIELDS.items():
        if body.get(name) is not None:
            changes[target] = body[name]
            origin[target] = name
    if stop is not None:
        changes["stop"] = stop
        origin["stop"] = "stop"
    if max_tokens is not None:
        changes["final_budget"] = max_tokens
        origin["final_budget"] = "max_tokens"
    for name, value in rsa_object.items():
        changes[name] = value
        origin[name] = f"rsa.{name}"
    if "budget" in changes and "final_budget" not in changes:
        changes["final_budget"] = None  # a budget set by hand is every stage's unless said otherwise
    merged = {**base, **changes, "preset": settings.config.preset if plan is None else None}
    if "early_exit" not in changes and not merged["rounds"] and merged["final"] != "aggregate":
        merged.update(early_exit=None, min_rounds=0)  # the server's early exit has nothing to stop in one stage
    try:
        config = RSAConfig.from_dict(merged)
    except ConfigError as exc:
        param = origin.get(exc.field, exc.field)
        message = str(exc).split(": ", 1)[1] if ": " in str(exc) else str(exc)
        raise RequestError(f"{param}: {message}", param) from None
    except TypeError as exc:
        raise RequestError(f"invalid RSA settings: {exc}", "rsa") from None
    _check_limits(config, settings.limits, origin)
    _check_amplification(config, settings.limits, origin, len(json.dumps(messages)) + len(json.dumps(tools)))

    last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
    ignored = tuple(sorted(k for k in body if k not in HANDLED))
    if ignored:
        logger.info("RSA request: ignoring fields it cannot use: %s", ", ".join(ignored))
    return ParsedRequest(
        **common, config=config, problem=messages[last_user]["content"], context=tuple(messages[:last_user]),
        trailing=tuple(messages[last_user + 1:]), tools=tuple(tools), tool_choice=body.get("tool_choice"),
        extra={k: body[k] for k in FORWARDED if body.get(k) is not None}, ignored=ignored,
        all_final=plan is not None,
    )


def _check_amplification(config: RSAConfig, limits: ServerLimits, origin: dict[str, str], prompt_bytes: int
                         ) -> None:
    """Bound what one request makes the server send upstream: requests (every generation, chunk and
    retry) and bytes (the conversation goes into every request)."""
    requests = config.generations * config.effective_max_chunks * (1 + config.candidate_retries)
    if requests > limits.max_requests_per_run:
        param = origin.get("chunk_size") or origin.get("population", "population")
        raise RequestError(f"{param}: this run could make {requests} upstream requests (generations x chunks x "
                           f"tries); at most {limits.max_requests_per_run} per run on this server", param)
    sent = prompt_bytes * config.generations * config.effective_max_chunks
    if sent > limits.max_upstream_bytes_per_run:
        raise RequestError(f"messages: this run would send about {sent // 2**20} MiB upstream (the conversation "
                           f"goes into each of its {config.generations * config.effective_max_chunks} requests); "
                           f"at most {limits.max_upstream_bytes_per_run // 2**20} MiB per run on this server",
                           "messages")


def _check_limits(config: RSAConfig, limits: ServerLimits, origin: dict[str, str]) -> None:
    checks = (("population", config.population, limits.max_population),
              ("rounds", config.rounds, limits.max_rounds),
              ("budget", config.budget, limits.max_budget),
              ("final_budget", config.last_stage_budget, limits.max_budget),
              ("final_n", config.final_n, limits.max_final_n),
              ("candidate_retries", config.candidate_retries, limits.max_candidate_retries))
    for name, value, cap in checks:
        if value > cap:
            param = origin.get(name, name)
            raise RequestError(f"{param}: at most {cap} on this server, got {value}", param)
