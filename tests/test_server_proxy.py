"""Reference-proxy bodies run what Zyphra's ``rsa_proxy_server.py`` runs: per stage, the same number of
generations, the same budget and the same sampling; every final aggregation comes back as a choice.

``proxy_stages`` restates the proxy's rules from its code (``pop_rsa_config`` and
``run_rsa_chat_completion``); the scripted backend records what the server actually issued.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import httpx
import pytest

from markov_rsa import RSAConfig
from markov_rsa.backends.base import Generation, GenerationRequest
from markov_rsa.server import ServerSettings, create_app
from tests.doubles import ScriptedBackend

PRESET = RSAConfig(population=5, k=3, rounds=3, budget=900, tail=300, seed=0, task="math", preset="small",
                   temperature=0.9, top_p=0.8, top_k=7)
HELLO = [{"role": "user", "content": "What is 2 + 2?"}]
ALIASES = {"rsa_short_resp_len": "short_resp_len", "final_aggregation_prompts": "rsa_final_n",
           "rsa_final_temperature": "final_temperature", "rsa_final_top_p": "final_top_p",
           "rsa_final_top_k": "final_top_k", "rsa_tail_window_len": "tail_window_len"}
Stage = tuple[int, int, float, float, int | None]


def proxy_stages(body: dict[str, Any]) -> list[Stage]:
    """(generations, max_tokens, temperature, top_p, top_k) per stage, as the proxy issues them. Where the
    client sets no sampling the proxy leaves the upstream's default; this server states 1.0 / 1.0 / off."""
    b = {ALIASES.get(k, k): v for k, v in body.items()}
    client = (b.get("temperature", 1.0), b.get("top_p", 1.0), b.get("top_k"))
    t = b.get("rsa_t", 8)
    if t <= 0:
        return [(1, b["max_tokens"], *client)]
    n = b.get("rsa_n", b.get("n", 32))
    final_n = b.get("rsa_final_n", 1)
    final_n = min(final_n if final_n > 0 else n, n)
    final = tuple(b.get(name, default) if b.get(name, default) is not None else mine
                  for name, default, mine in (("final_temperature", 0.6, client[0]), ("final_top_p", 0.95, client[1]),
                                              ("final_top_k", 40, client[2])))
    if final[2] is not None and final[2] <= 0:
        final = (final[0], final[1], None)
    return [(n, b.get("short_resp_len", 32768), *client)] * t + [(final_n, b["max_tokens"], *final)]


def run(body: dict[str, Any], responder: Any = None) -> tuple[httpx.Response, list[GenerationRequest]]:
    backend = ScriptedBackend(responder or (lambda request, number: f"The answer is \\boxed{{{number % 2 + 4}}}."))
    app = create_app(ServerSettings(backend=backend, config=PRESET))

    async def post() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
            return await client.post("/v1/chat/completions", json={"model": "m", "messages": HELLO, **body},
                                     timeout=60)

    import asyncio

    return asyncio.run(post()), backend.requests


def issued(requests: list[GenerationRequest]) -> list[Stage]:
    stages: dict[int, list[GenerationRequest]] = defaultdict(list)
    for request in requests:
        stages[request.tags.get("round", 0)].append(request)
    out = []
    for _, group in sorted(stages.items()):
        kinds = {(r.max_tokens, r.sampling.temperature, r.sampling.top_p, r.sampling.top_k) for r in group}
        assert len(kinds) == 1, f"one budget and sampling per stage, got {kinds}"
        out.append((len(group), *kinds.pop()))
    return out


BODIES = [
    {"rsa_n": 4, "rsa_k": 2, "rsa_t": 3, "max_tokens": 77},
    {"rsa_n": 4, "rsa_k": 2, "rsa_t": 2, "rsa_final_n": 0, "max_tokens": 50},
    {"rsa_n": 3, "rsa_k": 2, "rsa_t": 1, "rsa_final_n": 2, "max_tokens": 60},
    {"rsa_n": 4, "rsa_k": 2, "rsa_t": 0, "rsa_final_n": 3, "max_tokens": 40, "temperature": 0.2, "top_p": 0.5},
    {"rsa_n": 3, "rsa_k": 5, "rsa_t": 1, "max_tokens": 30},
    {"rsa_n": 2, "rsa_t": 1, "rsa_final_n": 5, "max_tokens": 30},
    {"rsa_n": 2, "rsa_k": 2, "rsa_t": 2, "rsa_short_resp_len": 100, "temperature": 0.7, "final_temperature": None,
     "max_tokens": 30},
    {"rsa_t": 1, "n": 3, "max_tokens": 30},
    {"rsa_n": 2, "rsa_t": 1, "final_aggregation_prompts": 2, "rsa_final_top_p": 0.5, "rsa_final_top_k": -1,
     "max_tokens": 30},
    {"rsa_n": 2, "rsa_k": 2, "rsa_t": 2, "short_resp_len": 1000, "max_tokens": 30},
    {"rsa_k": 2, "rsa_t": 1, "max_tokens": 30},
    {"rsa_n": 2, "rsa_k": 1, "rsa_t": 2, "rsa_tail_window": False, "short_resp_len": 50, "max_tokens": 30},
    {"rsa_n": 2, "rsa_t": 1, "rsa_final_temperature": 0.1, "final_top_p": None, "top_p": 0.3, "max_tokens": 30},
]


@pytest.mark.parametrize("body", BODIES)
def test_a_proxy_body_runs_the_proxys_stages_budgets_and_sampling(body):
    reply, requests = run(body)
    assert reply.status_code == 200, reply.text
    assert issued(requests) == proxy_stages(body)
    expected = proxy_stages(body)
    choices = reply.json()["choices"]
    assert len(choices) == (1 if len(expected) == 1 else expected[-1][0]), "every final aggregation is a choice"


def test_the_proxy_defaults_apply_not_the_servers_preset():
    reply, requests = run({"rsa_t": 2, "max_tokens": 30})
    assert reply.status_code == 200, reply.text
    assert issued(requests) == [(32, 32768, 1.0, 1.0, None)] * 2 + [(1, 30, 0.6, 0.95, 40)]
    aggregation = requests[32].messages[-1]["content"]
    assert aggregation.count("The answer is") == 4, "K is the proxy's 4, not the preset's 3"


def test_the_tail_window_is_cut_to_the_rollout_budget_and_the_answer_section_is_carried():
    def responder(request: GenerationRequest, number: int) -> Generation:
        return Generation(f"ANSWER-{number}", "stop", 10, 5, reasoning="thinking " * 40, reasoning_tokens=360)

    reply, requests = run({"rsa_n": 2, "rsa_k": 2, "rsa_t": 1, "short_resp_len": 64, "max_tokens": 30}, responder)
    assert reply.status_code == 200, reply.text
    final_prompt = requests[-1].messages[-1]["content"]
    assert "ANSWER-0" in final_prompt and "ANSWER-1" in final_prompt and "thinking" not in final_prompt


@pytest.mark.parametrize(("field", "value"), [
    ("rsa_summarize", True), ("summarize", "yes"), ("use_pacore", True), ("rsa_use_pacore", 1),
    ("return_aggregation_prompt", True), ("rsa_max_concurrency", 4), ("summary_prompt", "Summarise."),
    ("rsa_t", "8"), ("rsa_n", 0), ("rsa_tail_window", "maybe"),
])
def test_a_proxy_field_this_server_cannot_honour_is_a_400_naming_it(field, value):
    reply, requests = run({"rsa_n": 2, "rsa_t": 1, field: value, "max_tokens": 30})
    assert reply.status_code == 400 and reply.json()["error"]["param"] == field
    assert field in reply.json()["error"]["message"] and not requests


def test_proxy_fields_turned_off_run_as_usual():
    reply, requests = run({"rsa_n": 2, "rsa_t": 1, "rsa_summarize": False, "use_pacore": "false", "rsa_debug": True,
                           "rsa_max_concurrency": 0, "max_tokens": 30})
    assert reply.status_code == 200 and len(requests) == 3
