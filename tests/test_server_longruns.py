"""Long runs and the run cap: a run longer than a client's read timeout is kept alive and answered once,
and streamed runs take a slot of ``max_concurrent_runs`` as non-streamed ones do.

The upstream is the scripted backend with a delay, so a "long" run takes about a second.
"""

from __future__ import annotations

import asyncio

import httpx
import openai

from markov_rsa import RSAConfig
from markov_rsa.server import ServerLimits, ServerSettings, create_app
from tests.doubles import ScriptedBackend
from tests.servers import serve_app

SMALL = RSAConfig(population=2, k=2, rounds=1, budget=64, tail=16, seed=0, task="math", preset="small")
HELLO = [{"role": "user", "content": "What is 2 + 2?"}]


def answer(request, number):
    return "The answer is \\boxed{4}."


def test_a_run_longer_than_the_clients_timeout_is_answered_once():
    backend = ScriptedBackend(answer, delay=0.8)
    settings = ServerSettings(backend=backend, config=SMALL, heartbeat=0.15)
    with serve_app(create_app(settings)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=2, timeout=0.5)
        reply = client.chat.completions.create(model="m", messages=HELLO, extra_body={"extended_compute": True})
    assert reply.choices[0].message.content == "The answer is \\boxed{4}."
    assert len(backend.requests) == SMALL.generations, "one run, not one per client retry"


def test_a_quick_run_answers_with_its_own_status():
    backend = ScriptedBackend(answer)
    with serve_app(create_app(ServerSettings(backend=backend, config=SMALL, heartbeat=5))) as url:
        reply = httpx.post(f"{url}/v1/chat/completions", json={"messages": HELLO, "rsa": {"population": 999}})
        assert reply.status_code == 400 and not reply.text.startswith("\n")
        ok = httpx.post(f"{url}/v1/chat/completions", json={"messages": HELLO, "extended_compute": True})
        assert ok.status_code == 200 and ok.text.startswith("{")


def test_a_stream_sends_keep_alive_comments_while_the_upstream_is_silent():
    backend = ScriptedBackend(answer, delay=0.8)
    settings = ServerSettings(backend=backend, config=SMALL, heartbeat=0.15)
    with serve_app(create_app(settings)) as url, httpx.stream(
            "POST", f"{url}/v1/chat/completions", timeout=httpx.Timeout(0.5),
            json={"messages": HELLO, "stream": True, "extended_compute": True}) as reply:
        lines = [line for line in reply.iter_lines() if line]
    assert lines.count(": keep-alive") >= 4 and lines[-1] == "data: [DONE]"


def test_streamed_runs_respect_the_run_cap():
    backend = ScriptedBackend(answer, delay=0.4)
    settings = ServerSettings(backend=backend, config=SMALL, limits=ServerLimits(max_concurrent_runs=2))

    async def one(client: httpx.AsyncClient, url: str) -> int:
        async with client.stream("POST", f"{url}/v1/chat/completions",
                                 json={"messages": HELLO, "stream": True, "extended_compute": True}) as reply:
            await reply.aread()
            return reply.status_code

    async def burst(url: str) -> list[int]:
        async with httpx.AsyncClient(timeout=30) as client:
            return await asyncio.gather(*(one(client, url) for _ in range(12)))

    with serve_app(create_app(settings)) as url:
        statuses = asyncio.run(burst(url))
        assert sorted(statuses) == [200] * 2 + [429] * 10
        assert httpx.get(f"{url}/health").json()["runs_in_flight"] == 0
    assert len(backend.requests) == 2 * SMALL.generations
