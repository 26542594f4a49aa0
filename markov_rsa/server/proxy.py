"""The reference proxy's request fields (Zyphra's ``rsa_proxy_server.py``), run as the proxy runs them.

A client switching from the proxy sends the same body and gets the same method: the same stages, the
same number of generations per stage, the same budgets and sampling per stage, and every final
aggregation back as a choice. The proxy's rules, as its code has them:

- any of its fields (or their aliases, :data:`PROXY_ALIASES`) present makes the request an RSA
  request; fields it omits take the proxy's defaults (T 8, N the body's ``n`` or 32, K 4,
  ``short_resp_len`` 32768, ``tail_window_len`` 4096, ``rsa_final_n`` 1, final sampling 0.6 / 0.95 /
  40), not this server's preset;
- ``rsa_t`` of 0 (or less) is one plain request with the client's own fields;
- otherwise ``rsa_t + 1`` stages: ``rsa_n`` rollouts, ``rsa_t - 1`` aggregation rounds of ``rsa_n``
  at ``short_resp_len`` tokens with the client's sampling, then ``min(rsa_final_n, rsa_n)``
  aggregations (0 means ``rsa_n``) with the client's ``max_tokens`` at the final sampling (a final
  field sent as ``null`` keeps the client's value);
- ``rsa_k`` above the population samples the whole population; ``rsa_k: 1`` continues parent i;
- the tail window is at most the rollout's budget; ``rsa_tail_window: false`` carries whole rollouts;
- what is carried is what the upstream returned as the answer (``content``) where it splits
  reasoning out, the reasoning where the content is empty.

Differences that remain, by design: the proxy cuts tails on whitespace words, this server on model
tokens; the proxy returns ``rsa_metadata`` by default, this server only with ``return_rsa_metadata``
(its own metadata); each request of a run gets its own seed derived from the client's; and the
proxy's summarisation and PaCoRe prompts (``rsa_summarize``, ``use_pacore``, ``summary_prompt``),
``return_aggregation_prompt`` and ``rsa_max_concurrency`` are refused with a 400 naming the field.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from markov_rsa.server.errors import RequestError

#: The proxy's fields and their aliases, by canonical name (as its ``RSA_PARAM_ALIASES`` has them).
PROXY_ALIASES: dict[str, tuple[str, ...]] = {
    "rsa_t": ("rsa_t",),
    "rsa_k": ("rsa_k",),
    "rsa_n": ("rsa_n",),
    "rsa_summarize": ("rsa_summarize", "summarize"),
    "rsa_tail_window": ("rsa_tail_window", "rsa_use_tail_window"),
    "tail_window_len": ("tail_window_len", "rsa_tail_window_len"),
    "short_resp_len": ("short_resp_len", "rsa_short_resp_len"),
    "use_pacore": ("use_pacore", "rsa_use_pacore"),
    "rsa_final_n": ("rsa_final_n", "final_aggregation_prompts"),
    "final_temperature": ("final_temperature", "rsa_final_temperature"),
    "final_top_p": ("final_top_p", "rsa_final_top_p"),
    "final_top_k": ("final_top_k", "rsa_final_top_k"),
    "summary_prompt": ("summary_prompt", "rsa_summary_prompt"),
    "return_aggregation_prompt": ("return_aggregation_prompt", "rsa_return_aggregation_prompt"),
    "rsa_return_metadata": ("rsa_return_metadata",),
    "rsa_max_concurrency": ("rsa_max_concurrency",),
    "rsa_debug": ("rsa_debug",),
}
#: Every name that makes a request a proxy-style RSA request (``return_rsa_metadata`` is this
#: server's own flag too, so alone it does not).
PROXY_NAMES: frozenset[str] = frozenset(name for names in PROXY_ALIASES.values() for name in names)
#: The proxy's defaults (the ZAYA1-8B report's settings).
PROXY_DEFAULTS: dict[str, Any] = {
    "rsa_t": 8, "rsa_k": 4, "rsa_n": 32, "short_resp_len": 32768, "tail_window_len": 4096, "rsa_final_n": 1,
    "final_temperature": 0.6, "final_top_p": 0.95, "final_top_k": 40, "rsa_tail_window": True,
}
#: Proxy fields this server does not implement: a request that turns them on gets a 400.
UNSUPPORTED = {
    "rsa_summarize": "the proxy's summarisation stage is not implemented by this server; use tail windows",
    "use_pacore": "the proxy's PaCoRe prompts are not implemented by this server",
    "summary_prompt": "summaries (rsa_summarize) are not implemented by this server",
    "return_aggregation_prompt": "this server does not return aggregation prompts; return_rsa_metadata "
                                 "describes the run",
    "rsa_max_concurrency": "this server bounds upstream concurrency itself (rsa serve --max-concurrency)",
}


@dataclass(frozen=True)
class ProxyPlan:
    """What a proxy-style body runs: None changes for a plain request (``rsa_t`` <= 0), else RSAConfig
    changes and, per changed field, the request field it came from."""

    plain: bool
    changes: dict[str, Any]
    origin: dict[str, str]
    #: Fields of the body that are the proxy's (stripped before a plain request goes upstream).
    names: tuple[str, ...]
    metadata: bool = False


def _read(body: dict[str, Any], canonical: str) -> tuple[str, Any] | None:
    for alias in PROXY_ALIASES[canonical]:
        if alias in body:
            return alias, body[alias]
    return None


def _bool(name: str, value: Any) -> bool:
    """A flag as the proxy reads one: a JSON boolean, null (false), or 1/0, true/false, yes/no, on/off."""
    if isinstance(value, bool):
        return value
    if value is None:
        return False
    text = str(value).strip().lower()
    if text in {"1", "true", "yes", "y", "on"}:
        return True
    if text in {"0", "false", "no", "n", "off"}:
        return False
    raise RequestError(f"{name} must be true or false, got {value!r}", name)


def _int(name: str, value: Any, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f"{name} must be an integer, got {value!r}", name)
    if minimum is not None and value < minimum:
        raise RequestError(f"{name} must be at least {minimum}, got {value}", name)
    return value


def _optional_number(name: str, value: Any, kind: type) -> Any:
    if value is None:
        return None
    if kind is int:
        number = _int(name, value)
        return number if number > 0 else None  # top-k 0 or -1 is off, as servers read it
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError(f"{name} must be a number or null, got {value!r}", name)
    return float(value)


def proxy_plan(body: dict[str, Any]) -> ProxyPlan | None:
    """The proxy's reading of ``body``, or None where the body has none of its fields."""
    names = tuple(sorted(k for k in body if k in PROXY_NAMES))
    if not names:
        return None
    given: dict[str, tuple[str, Any]] = {}
    for canonical in PROXY_ALIASES:
        found = _read(body, canonical)
        if found is not None:
            given[canonical] = found

    def value(canonical: str) -> tuple[str, Any]:
        if canonical in given:
            return given[canonical]
        if canonical == "rsa_n" and body.get("n") is not None:
            return "n", body["n"]
        return canonical, PROXY_DEFAULTS.get(canonical)

    for canonical, why in UNSUPPORTED.items():
        if canonical not in given:
            continue
        alias, raw = given[canonical]
        on = _bool(alias, raw) if canonical in ("rsa_summarize", "use_pacore", "return_aggregation_prompt") else (
            raw not in (None, 0, "") if canonical == "rsa_max_concurrency" else raw is not None)
        if on:
            raise RequestError(f"{alias}: {why}", alias)
    if "rsa_debug" in given:
        _bool(*given["rsa_debug"])
    metadata = _bool(*given["rsa_return_metadata"]) if "rsa_return_metadata" in given else False

    t_name, t = value("rsa_t")
    t = _int(t_name, t)
    if t <= 0:
        return ProxyPlan(True, {}, {}, names, metadata)
    n_name, n = value("rsa_n")
    n = _int(n_name, n, 1)
    k_name, k = value("rsa_k")
    k = _int(k_name, k, 1)
    budget_name, budget = value("short_resp_len")
    budget = _int(budget_name, budget, 1)
    tail_name, tail = value("tail_window_len")
    tail = _int(tail_name, tail, 1)
    window_name, window = value("rsa_tail_window")
    if not _bool(window_name, window):
        tail = budget  # no window: the whole rollout is carried
    final_name, final_n = value("rsa_final_n")
    final_n = _int(final_name, final_n)
    final_n = min(final_n if final_n > 0 else n, n)

    changes: dict[str, Any] = {
        "population": n, "k": min(k, n), "rounds": t - 1, "budget": budget, "tail": min(tail, budget),
        "final": "aggregate", "final_n": final_n, "tail_source": "answer",
    }
    origin = {"population": n_name, "k": k_name, "rounds": t_name, "budget": budget_name, "tail": tail_name,
              "final_n": final_name}
    for canonical, target, kind in (("final_temperature", "final_temperature", float),
                                    ("final_top_p", "final_top_p", float), ("final_top_k", "final_top_k", int)):
        name, raw = value(canonical)
        changes[target] = _optional_number(name, raw, kind)
        origin[target] = name
    return ProxyPlan(False, changes, origin, names, metadata)
