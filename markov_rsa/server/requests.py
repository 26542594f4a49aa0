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

The reference proxy's fields (``rsa_n``...) run what the proxy runs (:func:`proxy_config`).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

from markov_rsa.backends.base import GenerationRequest, Message, SamplingParams
from markov_rsa.errors import ConfigError
from markov_rsa.rsa.config import RSAConfig
from markov_rsa.server.settings import ServerLimits, ServerSettings

logger = logging.getLogger("markov_rsa.server")

#: The reference proxy's request fields and the RSAConfig field each one sets.
PROXY_FIELDS: dict[str, str] = {
    "rsa_n": "population",
    "rsa_k": "k",
    "rsa_t": "rounds",
    "short_resp_len": "budget",
    "tail_window_len": "tail",
    "rsa_final_n": "final_n",
    "final_temperature": "final_temperature",
    "final_top_p": "final_top_p",
    "final_top_k": "final_top_k",
}
#: The reference proxy's final-stage sampling when a request does not set it.
PROXY_FINAL_SAMPLING = {"final_temperature": 0.6, "final_top_p": 0.95, "final_top_k": 40}
SAMPLING_FIELDS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "seed": "seed"}
#: Fields an RSA request passes to every rollout as they are.
FORWARDED = ("response_format",)
#: Fields an RSA request cannot honour, and why.
REFUSED = {
    "logprobs": "RSA returns a voted answer, not one sequence's token log-probabilities",
    "top_logprobs": "RSA returns a voted answer, not one sequence's token log-probabilities",
}
OURS = {"extended_compute", "return_rsa_metadata", "rsa", *PROXY_FIELDS}
HANDLED = {"model", "messages", "stream", "stream_options", "max_tokens", "max_completion_tokens", "n", "stop",
           "tools", "tool_choice", *SAMPLING_FIELDS, *FORWARDED, *REFUSED, *OURS}


class RequestError(Exception):
    """An invalid request: becomes an OpenAI-style error body naming the parameter."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.param, self.status, self.kind = param, status, kind


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


def reject_constant(name: str) -> Any:
    """``json.loads`` hook: NaN and infinities are not JSON numbers a request may carry."""
    raise RequestError(f"the request body holds {name}, which is not a valid JSON number")


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
    proxy = {k: body[k] for k in PROXY_FIELDS if body.get(k) is not None}
    common: dict[str, Any] = {"body": body, "stream": bool(body.get("stream")),
              "include_usage": bool(stream_options.get("include_usage")),
              "metadata": bool(body.get("return_rsa_metadata"))}
    if not (body.get("extended_compute") or proxy or rsa_object):
        if not isinstance(body.get("messages"), list) or not body["messages"]:
            raise RequestError("messages must be a non-empty list", "messages")
        return ParsedRequest(**common)
    return _rsa_request(body, settings, proxy, rsa_object or {}, common)


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


def _rsa_request(body: dict[str, Any], settings: ServerSettings, proxy: dict[str, Any], rsa_object: dict[str, Any],
                 common: dict[str, Any]) -> ParsedRequest:
    messages = _messages(body.get("messages"), settings.limits)
    for name, why in REFUSED.items():
        if body.get(name) not in (None, False, 0):
            raise RequestError(f"{name}: not supported with RSA ({why})", name)
    n = _number(body, "n", int, minimum=1)
    if n not in (None, 1):
        raise RequestError("n: only n=1 is supported with RSA (rsa.final='population' returns the whole "
                           "population)", "n")
    stop, max_tokens, tools = _generation_fields(body)

    changes: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for name, target in SAMPLING_FIELDS.items():
        if body.get(name) is not None:
            changes[target] = body[name]
            origin[target] = name
    if stop is not None:
        changes["stop"] = stop
        origin["stop"] = "stop"
    if proxy:
        proxy_changes, proxy_origin = proxy_config(proxy, settings.config, max_tokens)
        changes.update(proxy_changes)
        origin.update(proxy_origin)
    elif max_tokens is not None:
        changes["final_budget"] = max_tokens
        origin["final_budget"] = "max_tokens"
    for name, value in rsa_object.items():
        changes[name] = value
        origin[name] = f"rsa.{name}"
    if "budget" in changes and "final_budget" not in changes:
        changes["final_budget"] = None  # a budget set by hand is every stage's unless said otherwise
    merged = {**settings.config.to_dict(), **changes, "preset": settings.config.preset}
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

    last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
    ignored = tuple(sorted(k for k in body if k not in HANDLED))
    if ignored:
        logger.info("RSA request: ignoring fields it cannot use: %s", ", ".join(ignored))
    return ParsedRequest(
        **common, config=config, problem=messages[last_user]["content"], context=tuple(messages[:last_user]),
        trailing=tuple(messages[last_user + 1:]), tools=tuple(tools), tool_choice=body.get("tool_choice"),
        extra={k: body[k] for k in FORWARDED if body.get(k) is not None}, ignored=ignored,
    )


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


def proxy_config(proxy: dict[str, Any], base: RSAConfig, max_tokens: int | None) -> tuple[dict[str, Any],
                                                                                          dict[str, str]]:
    """What a request using the reference proxy's fields runs, as the proxy runs it: ``rsa_t + 1``
    stages in all, the last issuing ``rsa_final_n`` prompts (default 1; 0 means ``rsa_n``) at the
    final sampling (default 0.6 / 0.95 / 40), with the request's ``max_tokens`` as that stage's
    budget. Returns RSAConfig changes and, per changed field, the request field it came from."""
    changes: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for name in ("rsa_n", "rsa_k", "short_resp_len", "tail_window_len"):
        if name in proxy:
            changes[PROXY_FIELDS[name]] = proxy[name]
            origin[PROXY_FIELDS[name]] = name
    for name, default in PROXY_FINAL_SAMPLING.items():
        changes[name] = proxy.get(name, default)
        origin[name] = name
    population = changes.get("population", base.population)
    stages = proxy.get("rsa_t", base.rounds)
    final_n = proxy.get("rsa_final_n", 1)
    for name, value in (("rsa_t", stages), ("rsa_final_n", final_n)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise RequestError(f"{name} must be a non-negative integer, got {value!r}", name)
    if not isinstance(population, int) or isinstance(population, bool):
        raise RequestError(f"rsa_n must be an integer, got {population!r}", "rsa_n")
    final_n = final_n or population
    if max_tokens is not None:
        changes["final_budget"] = max_tokens
        origin["final_budget"] = "max_tokens"
    if stages == 0:  # one stage, which is the last: final_n rollouts at the final sampling
        changes.update(rounds=0, final="majority", population=final_n, temperature=changes["final_temperature"],
                       top_p=changes["final_top_p"], top_k=changes["final_top_k"])
        origin.update(population="rsa_final_n", rounds="rsa_t")
    else:
        changes.update(rounds=stages - 1, final="aggregate", final_n=final_n)
        origin.update(rounds="rsa_t", final_n="rsa_final_n")
    return changes, origin
