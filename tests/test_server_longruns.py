"""Long runs and the run cap: a run longer than a client's read timeout is kept alive and answered once,
and streamed runs take a slot of ``max_concurrent_runs`` as non-streamed ones do.

The upstream is the scripted backend with a delay, so a "long" run takes about a second.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from markov_rsa import RSAConfig
from markov_rsa.server import ServerLimits, ServerSettings, create_app
from tests.doubles import ScriptedBackend
from tests.servers import free_port, serve_app, sse, sse_chunks, wait_until_up

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


# -- the serve command: operator flags, tokens, and draining on SIGTERM ------------------------------
def slow_upstream(seconds: float) -> Starlette:
    """A chat server that thinks for ``seconds`` before it streams its answer."""

    async def chat(request: Request) -> Response:
        await asyncio.sleep(seconds)
        completion = {"id": "c", "model": "m", "choices": [{"index": 0, "finish_reason": "stop", "message": {
            "role": "assistant", "content": "The answer is \\boxed{4}."}}],
                      "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}}
        return sse(sse_chunks(completion))

    return Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])


def rsa_serve(upstream: str, *flags: str, token: str | None = None) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {**os.environ, "SERVE_TOKEN": token} if token else dict(os.environ)
    process = subprocess.Popen([sys.executable, "-m", "markov_rsa.cli.app", "serve", "--port", str(port),
                                "--base-url", upstream, "--model", "m", *flags],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    return process, f"http://127.0.0.1:{port}"


@pytest.mark.parametrize(("flags", "token", "field"), [
    (("--api-key-env", "SERVE_TOKEN"), "x", "api_key_env"),
    (("--population", "32", "--max-population", "8"), None, "population"),
    (("--max-rounds", "0"), None, "max_rounds"),
])
def test_serve_refuses_weak_tokens_and_defaults_beyond_its_caps(flags, token, field):
    process, _ = rsa_serve("http://127.0.0.1:9/v1", *flags, token=token)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 2 and field in err.decode() and b"Traceback" not in err


@pytest.mark.parametrize(("thinking", "drain", "answered"), [(1.0, 20, True), (60.0, 1, False)])
def test_sigterm_drains_runs_for_a_bounded_time(thinking, drain, answered):
    with serve_app(slow_upstream(thinking)) as up:
        process, url = rsa_serve(f"{up}/v1", "--population", "1", "--rounds", "0", "--budget", "64", "--tail",
                                 "16", "--drain-seconds", str(drain))
        try:
            wait_until_up(f"{url}/health", process=process, timeout=60)
            outcome: dict[str, object] = {}

            def ask() -> None:
                try:
                    reply = httpx.post(f"{url}/v1/chat/completions", timeout=120,
                                       json={"messages": HELLO, "extended_compute": True})
                    outcome["text"] = reply.json()["choices"][0]["message"]["content"]
                except (httpx.HTTPError, ValueError, KeyError) as exc:
                    outcome["error"] = exc

            client = threading.Thread(target=ask)
            client.start()
            time.sleep(0.5)
            started = time.monotonic()
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=drain + 15)
            client.join(timeout=10)
        finally:
            if process.poll() is None:
                process.kill()
    assert process.returncode is not None and time.monotonic() - started < drain + 10
    assert ("text" in outcome) is answered, outcome


def test_a_client_that_leaves_during_the_keep_alive_cancels_its_run_and_frees_its_slot():
    backend = ScriptedBackend(answer, delay=5)
    settings = ServerSettings(backend=backend, config=SMALL, heartbeat=0.1)
    with serve_app(create_app(settings)) as url:
        with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=10,
                          json={"messages": HELLO, "extended_compute": True}) as reply:
            first = next(reply.iter_raw())
        assert reply.status_code == 200 and first.strip() == b""
        deadline = time.monotonic() + 5
        while httpx.get(f"{url}/health").json()["runs_in_flight"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert httpx.get(f"{url}/health").json()["runs_in_flight"] == 0
        assert backend.cancelled == SMALL.population and len(backend.requests) == SMALL.population
