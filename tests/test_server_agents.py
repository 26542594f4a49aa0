"""`rsa serve` as a drop-in for agent frameworks, and as a server that stays up under load and abuse.

Clients are the official ``openai`` client and the OpenAI Agents SDK (``openai-agents``); upstreams are
loopback servers on 127.0.0.1: ``AgentUpstream`` answers like a tool-calling model, ``FaultServer``
injects failures.
"""

from __future__ import annotations

import asyncio
import gc
import json
import subprocess
import sys
import time

import httpx
import openai
import psutil
import pytest

from markov_rsa import RSAConfig
from markov_rsa.backends.openai import OpenAIBackend, RetryPolicy
from markov_rsa.server import ServerLimits, ServerSettings, create_app
from tests.servers import AgentUpstream, FaultServer, VLLMLike, free_port, serve_app

FAST = RetryPolicy(max_attempts=3, initial_backoff=0.01, max_backoff=0.05)
SMALL = RSAConfig(population=3, k=2, rounds=1, budget=64, tail=16, seed=0, task="generic", preset="small")
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}}]
RSA = {"extended_compute": True}


@pytest.fixture
def agent_server():
    """An rsa serve app in front of a tool-calling upstream; yields (upstream, app url)."""
    upstream = AgentUpstream()
    with serve_app(upstream.app()) as up:
        backend = OpenAIBackend(f"{up}/v1", model="agent-model", retry=FAST)
        with serve_app(create_app(ServerSettings(backend=backend, config=SMALL, model_name="rsa"))) as url:
            yield upstream, url


def client_for(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


# -- 1. pass-through is transparent ---------------------------------------------------------------
def test_pass_through_sends_every_field_and_relays_the_reply_unchanged(agent_server):
    upstream, url = agent_server
    body = {
        "model": "rsa", "tools": TOOLS, "tool_choice": "auto", "response_format": {"type": "text"},
        "logprobs": False, "n": 1, "parallel_tool_calls": True, "chat_template_kwargs": {"enable_thinking": False},
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Weather in "}, {"type": "text", "text": "Paris?"}]},
            {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {
                "name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        ],
    }
    reply = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30)
    assert reply.status_code == 200
    assert upstream.bodies[-1] == {**body, "model": "agent-model"}, "every field went upstream as it came"
    assert reply.json()["choices"][0]["message"]["content"] == "It is sunny in Paris."
    streamed = client_for(url).chat.completions.create(model="rsa", messages=body["messages"], tools=TOOLS,
                                                       stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert text == "It is sunny in Paris."


def test_upstream_errors_keep_their_status_but_not_the_upstreams_internals():
    for status, expected in ((400, 400), (422, 422), (401, 502), (503, 502)):
        upstream = AgentUpstream(status=status)
        with serve_app(upstream.app()) as up:
            backend = OpenAIBackend(f"{up}/v1", model="agent-model", retry=FAST, api_key="sk-upstream-secret")
            with serve_app(create_app(ServerSettings(backend=backend, config=SMALL))) as url:
                reply = httpx.post(f"{url}/v1/chat/completions", json={"messages": [{"role": "user",
                                                                                      "content": "hi"}]}, timeout=30)
                rsa = httpx.post(f"{url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                                     **RSA}, timeout=30)
        for response in (reply, rsa):
            text = response.text
            assert response.status_code == expected, (status, response.status_code, text)
            assert up.split("//")[1] not in text and "10.1.2.3" not in text and "sk-upstream-secret" not in text
            assert "error" in response.json()


# -- 2-5. RSA requests behave like chat completions -----------------------------------------------
def test_the_conversation_is_kept_in_every_candidates_prompt(agent_server):
    upstream, url = agent_server
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi."},
                {"role": "assistant", "content": "Hello."},
                {"role": "user", "content": [{"type": "text", "text": "Say hello "},
                                             {"type": "text", "text": "again"}]}]
    reply = client_for(url).chat.completions.create(model="rsa", messages=messages, extra_body=RSA, store=True,
                                                    metadata={"k": "v"}, user="u1", seed=7, stop=["END"],
                                                    max_tokens=33)
    assert reply.choices[0].message.content
    rsa_bodies = [b for b in upstream.bodies]
    assert len(rsa_bodies) == 3 * 2
    for b in rsa_bodies:
        assert b["messages"][:3] == messages[:3], "system and earlier turns are kept, not flattened"
        assert "Say hello again" in b["messages"][-1]["content"]
        assert b["stop"] == ["END"]
        assert "store" not in b and "metadata" not in b and "user" not in b, "harmless fields are not forwarded"
    assert {b["max_tokens"] for b in rsa_bodies[-3:]} == {33}, "max_tokens is the last stage's budget"


def test_rsa_with_tools_votes_on_normalised_calls_and_replies_in_openai_format(agent_server):
    upstream, url = agent_server
    client = client_for(url)
    question = [{"role": "user", "content": "What is the weather in Paris?"}]
    reply = client.chat.completions.create(model="rsa", messages=question, tools=TOOLS, extra_body={
        **RSA, "return_rsa_metadata": True})
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    assert reply.model_extra["rsa_metadata"]["votes"] == 3, "differently spaced JSON votes together"
    assert all(b["tools"] == TOOLS for b in upstream.bodies), "every candidate had the tools"
    # The agent loop goes on unchanged: append the call and its result, ask again.
    followup = [*question, choice.message.model_dump(exclude_none=True),
                {"role": "tool", "tool_call_id": call.id, "content": "sunny"}]
    final = client.chat.completions.create(model="rsa", messages=followup, tools=TOOLS, extra_body=RSA)
    assert final.choices[0].finish_reason == "stop" and final.choices[0].message.content == "It is sunny in Paris."
    streamed = list(client.chat.completions.create(model="rsa", messages=question, tools=TOOLS, stream=True,
                                                   extra_body=RSA))
    calls = [d.choices[0].delta.tool_calls for d in streamed if d.choices and d.choices[0].delta.tool_calls]
    assert calls and calls[0][0].function.name == "get_weather"
    assert any(d.choices and d.choices[0].finish_reason == "tool_calls" for d in streamed)


def test_an_openai_agents_sdk_agent_runs_through_rsa(agent_server):
    from agents import Agent, ModelSettings, OpenAIChatCompletionsModel, Runner, function_tool, set_tracing_disabled

    _, url = agent_server
    set_tracing_disabled(True)
    asked: list[str] = []

    @function_tool
    def get_weather(city: str) -> str:
        """Weather in a city."""
        asked.append(city)
        return "sunny"

    model = OpenAIChatCompletionsModel(model="rsa", openai_client=openai.AsyncOpenAI(base_url=f"{url}/v1",
                                                                                    api_key="unused"))
    agent = Agent(name="forecaster", instructions="Answer weather questions.", tools=[get_weather], model=model,
                  model_settings=ModelSettings(extra_body=RSA))
    result = asyncio.run(Runner.run(agent, "What is the weather in Paris?"))
    assert asked == ["Paris"] and result.final_output == "It is sunny in Paris."


def test_an_agent_with_the_sdks_default_responses_model_runs_through_rsa(agent_server):
    """openai-agents' default model speaks the Responses API; run and run_streamed both go through RSA."""
    from agents import Agent, ModelSettings, OpenAIResponsesModel, Runner, function_tool, set_tracing_disabled

    upstream, url = agent_server
    set_tracing_disabled(True)
    asked: list[str] = []

    @function_tool
    def get_weather(city: str) -> str:
        """Weather in a city."""
        asked.append(city)
        return "sunny"

    def agent() -> Agent:  # one client per event loop
        model = OpenAIResponsesModel(model="rsa", openai_client=openai.AsyncOpenAI(base_url=f"{url}/v1",
                                                                                  api_key="unused"))
        return Agent(name="forecaster", instructions="Answer weather questions.", tools=[get_weather], model=model,
                     model_settings=ModelSettings(extra_body=RSA))

    async def run() -> str:
        return str((await Runner.run(agent(), "What is the weather in Paris?")).final_output)

    assert asyncio.run(run()) == "It is sunny in Paris." and asked == ["Paris"]
    assert len(upstream.bodies) == 2 * SMALL.generations, "both turns ran RSA"
    assert upstream.bodies[-1]["messages"][0] == {"role": "system", "content": "Answer weather questions."}

    async def streamed() -> tuple[str, list[str]]:
        run = Runner.run_streamed(agent(), "What is the weather in Paris?")
        kinds = [event.type async for event in run.stream_events()]
        return str(run.final_output), kinds

    output, kinds = asyncio.run(streamed())
    assert output == "It is sunny in Paris." and asked == ["Paris", "Paris"] and "raw_response_event" in kinds


def test_responses_requests_are_checked_like_chat_requests(agent_server):
    _, url = agent_server
    for body, param in (({"input": "hi", "extended_compute": True, "previous_response_id": "resp_1"},
                         "previous_response_id"),
                        ({"input": [{"type": "input_image", "image_url": "x"}], "extended_compute": True},
                         "input[0].type"),
                        ({"input": "hi", "rsa": {"population": 10**6}}, "rsa.population")):
        reply = httpx.post(f"{url}/v1/responses", json={"model": "rsa", **body}, timeout=30)
        assert reply.status_code == 400 and reply.json()["error"]["param"] == param


# -- 6. disconnects release everything ------------------------------------------------------------
def test_fifty_disconnects_then_an_ordinary_request_succeeds_promptly():
    server = VLLMLike(lambda prompt, body: "r" * 300 + "</think>\\boxed{1}", token_rate=100)
    with serve_app(server.app()) as up:
        backend = OpenAIBackend(f"{up}/v1", model="m", retry=FAST, max_concurrency=16)
        settings = ServerSettings(backend=backend, config=SMALL.replace(population=2, budget=400),
                                  limits=ServerLimits(max_concurrent_runs=64))
        with serve_app(create_app(settings)) as url:
            for _ in range(50):
                with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=30,
                                  json={"messages": [{"role": "user", "content": "q"}], "stream": True, **RSA}) as r:
                    for line in r.iter_lines():
                        if line.startswith(": rsa"):
                            break  # the client goes away mid-run
            started = time.monotonic()
            reply = httpx.post(f"{url}/v1/chat/completions", timeout=60,
                               json={"messages": [{"role": "user", "content": "q"}], "max_tokens": 5})
            assert reply.status_code == 200 and time.monotonic() - started < 10
            deadline = time.monotonic() + 20
            while httpx.get(f"{url}/health").json()["runs_in_flight"] and time.monotonic() < deadline:
                time.sleep(0.1)
            assert httpx.get(f"{url}/health").json()["runs_in_flight"] == 0, "every disconnected run ended"


# -- 7. limits ------------------------------------------------------------------------------------
def test_limits_body_size_nan_and_concurrent_runs():
    server = VLLMLike(lambda prompt, body: "r" * 200 + "</think>\\boxed{1}", token_rate=200)
    with serve_app(server.app()) as up:
        backend = OpenAIBackend(f"{up}/v1", model="m", retry=FAST)
        settings = ServerSettings(backend=backend, config=SMALL,
                                  limits=ServerLimits(max_concurrent_runs=2, max_body_bytes=10_000))
        with serve_app(create_app(settings)) as url:
            chat = f"{url}/v1/chat/completions"
            big = httpx.post(chat, json={"messages": [{"role": "user", "content": "x" * 20_000}]}, timeout=10)
            assert big.status_code == 413
            nan = httpx.post(chat, content=b'{"messages": [{"role": "user", "content": "q"}], "temperature": NaN, '
                                           b'"extended_compute": true}', headers={"content-type": "application/json"})
            assert nan.status_code == 400 and "NaN" in nan.json()["error"]["message"]

            async def burst() -> list[httpx.Response]:
                async with httpx.AsyncClient(timeout=60) as client:
                    return list(await asyncio.gather(*(client.post(chat, json={
                        "messages": [{"role": "user", "content": "q"}], **RSA}) for _ in range(5))))

            statuses = [r.status_code for r in asyncio.run(burst())]
            assert statuses.count(200) >= 2 and 429 in statuses
            refused = next(r for r in asyncio.run(burst()) if r.status_code == 429)
            assert refused.headers["retry-after"] == "2"


# -- 8. safe defaults -----------------------------------------------------------------------------
def test_without_a_token_only_loopback_hosts_and_json_bodies(agent_server):
    _, url = agent_server
    chat = f"{url}/v1/chat/completions"
    body = json.dumps({"messages": [{"role": "user", "content": "hi"}]})
    rebinding = httpx.post(chat, content=body, headers={"host": "evil.example:8000",
                                                        "content-type": "application/json"})
    assert rebinding.status_code == 403
    cross_site = httpx.post(chat, content=body, headers={"content-type": "text/plain"})
    assert cross_site.status_code == 415
    assert httpx.post(chat, content=body, headers={"content-type": "application/json"}).status_code == 200


def test_rsa_serve_refuses_to_bind_beyond_loopback_without_a_token():
    out = subprocess.run([sys.executable, "-m", "markov_rsa.cli.app", "serve", "--host", "0.0.0.0", "--port",
                          str(free_port()), "--base-url", "http://127.0.0.1:9/v1", "--model", "m"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "needs a bearer token" in out.stderr and "Traceback" not in out.stderr


def test_no_secret_in_any_repr():
    backend = OpenAIBackend("http://127.0.0.1:9/v1", model="m", api_key="sk-upstream-secret")
    settings = ServerSettings(backend=backend, config=SMALL, api_key="server-secret")
    assert "sk-upstream-secret" not in repr(backend) + repr(settings) and "server-secret" not in repr(settings)


# -- 9. health and metrics ------------------------------------------------------------------------
def test_health_answers_during_runs_and_metrics_count_them():
    server = VLLMLike(lambda prompt, body: "r" * 150 + "</think>\\boxed{1}", token_rate=100)
    with serve_app(server.app()) as up:
        backend = OpenAIBackend(f"{up}/v1", model="m", retry=FAST)
        with serve_app(create_app(ServerSettings(backend=backend, config=SMALL))) as url:
            async def scenario() -> tuple[list[float], httpx.Response]:
                async with httpx.AsyncClient(timeout=60) as client:
                    run = asyncio.ensure_future(client.post(f"{url}/v1/chat/completions", json={
                        "messages": [{"role": "user", "content": "q"}], **RSA}))
                    await asyncio.sleep(0.5)
                    timings = []
                    for _ in range(5):
                        started = time.monotonic()
                        health = await client.get(f"{url}/health")
                        timings.append(time.monotonic() - started)
                        assert health.json()["runs_in_flight"] == 1
                    return timings, await run

            timings, reply = asyncio.run(scenario())
            assert reply.status_code == 200 and max(timings) < 0.5
            text = httpx.get(f"{url}/metrics").text
    values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if not line.startswith("#")}
    assert values["markov_rsa_runs_total"] == 1 and values["markov_rsa_runs_in_flight"] == 0
    assert values["markov_rsa_generations_total"] == 6 and values["markov_rsa_completion_tokens_total"] > 0
    assert "markov_rsa_backend_retries_total" in values and "markov_rsa_upstream_errors_total" in values


# -- load -----------------------------------------------------------------------------------------
def test_load_mixed_clients_against_a_faulty_upstream_all_answered_and_resources_return():
    """300 concurrent requests: pass-through (plain and streamed), RSA (plain and streamed) and clients that
    disconnect mid-stream, against an upstream whose first answer to a body is often a 503. Every
    well-formed request is answered; afterwards no upstream connection is left open and memory is back."""
    upstream = FaultServer(faults=lambda body: ["503"] if body.get("seed", 0) % 3 == 0 else [], delay=0.02)
    process = psutil.Process()
    with serve_app(upstream.app()) as up:
        port = int(up.rsplit(":", 1)[1])
        backend = OpenAIBackend(f"{up}/v1", model="m", retry=FAST, max_concurrency=128)
        settings = ServerSettings(backend=backend, config=SMALL.replace(population=2, budget=40),
                                  limits=ServerLimits(max_concurrent_runs=400))
        with serve_app(create_app(settings)) as url:
            chat = f"{url}/v1/chat/completions"

            def upstream_connections() -> int:
                return sum(1 for c in process.net_connections("tcp")
                           if c.raddr and c.raddr.port == port and c.status == psutil.CONN_ESTABLISHED)

            async def one(client: httpx.AsyncClient, i: int) -> str:
                body = {"messages": [{"role": "user", "content": f"question {i}"}], "seed": i}
                kind = i % 5
                if kind == 0:
                    return str((await client.post(chat, json=body)).status_code)
                if kind == 1:
                    return str((await client.post(chat, json={**body, **RSA})).status_code)
                async with client.stream("POST", chat, json={**body, "stream": True, **({} if kind == 2 else RSA)}) \
                        as response:
                    async for line in response.aiter_lines():
                        if kind == 4 and line.startswith(": rsa"):
                            return "left"
                        if line == "data: [DONE]":
                            return str(response.status_code)
                return "no [DONE]"

            async def load() -> list[str]:
                async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=400)) as client:
                    await one(client, 1)
                    return list(await asyncio.gather(*(one(client, i) for i in range(300))))

            gc.collect()
            rss_before = process.memory_info().rss
            outcomes = asyncio.run(load())
            assert set(outcomes) <= {"200", "left"}, [o for o in outcomes if o not in ("200", "left")][:5]
            assert outcomes.count("left") == 60
            deadline = time.monotonic() + 20
            while httpx.get(f"{url}/health").json()["runs_in_flight"] and time.monotonic() < deadline:
                time.sleep(0.1)
            asyncio.run(backend.aclose())
            time.sleep(0.5)
            assert httpx.get(f"{url}/health").json()["runs_in_flight"] == 0
            assert upstream_connections() == 0, "no upstream connection is left open"
            gc.collect()
            assert process.memory_info().rss - rss_before < 150 * 2**20, "memory is back near its baseline"
