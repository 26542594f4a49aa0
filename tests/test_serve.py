"""`rsa serve` driven by the official openai client, over llama.cpp's server and the local model."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest

from markov_rsa import RSAConfig
from markov_rsa.backends.openai import OpenAIBackend
from markov_rsa.server import ServerSettings, create_app
from tests.servers import FaultServer, free_port, llama_server, serve_app, wait_until_up
from tests.test_openai_backend import FAST, gguf_path

SMALL = RSAConfig(population=2, k=2, rounds=1, budget=24, tail=8, seed=0, task="generic", preset="small")
HELLO = [{"role": "user", "content": "What is 2 + 2?"}]


@pytest.fixture(scope="module")
def upstream():
    with llama_server(gguf_path()) as url:
        yield url


@pytest.fixture(scope="module")
def served(upstream):
    backend = OpenAIBackend(upstream, model="smollm2")
    settings = ServerSettings(backend=backend, config=SMALL, api_key="server-token", model_name="rsa-smol")
    with serve_app(create_app(settings)) as url:
        yield url


@pytest.fixture
def client(served):
    return openai.OpenAI(base_url=f"{served}/v1", api_key="server-token", max_retries=0)


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list()] == ["rsa-smol"]


def test_plain_request_passes_straight_through(client):
    reply = client.chat.completions.create(model="rsa-smol", messages=HELLO, max_tokens=12, temperature=0)
    assert reply.choices[0].message.content and reply.usage.completion_tokens <= 12
    assert reply.usage.prompt_tokens > 0 and "rsa_metadata" not in (reply.model_extra or {})


def test_extended_compute_runs_the_preset_and_sums_usage(client):
    reply = client.chat.completions.create(
        model="rsa-smol", messages=HELLO, extra_body={"extended_compute": True, "return_rsa_metadata": True},
    )
    meta = reply.model_extra["rsa_metadata"]
    assert [r["kind"] for r in meta["rounds"]] == ["initial", "aggregate"]
    assert meta["config"]["population"] == 2 and meta["config"]["preset"] == "small"
    generated = sum(r["usage"]["completion_tokens"] for r in meta["rounds"])
    assert reply.usage.completion_tokens == generated and reply.choices[0].message.content is not None


def test_reference_proxy_fields_set_the_same_parameters(client):
    reply = client.chat.completions.create(
        model="rsa-smol", messages=HELLO,
        extra_body={"rsa_n": 3, "rsa_k": 2, "rsa_t": 1, "short_resp_len": 16, "tail_window_len": 6,
                    "rsa_final_n": 2, "final_temperature": 0.3, "final_top_p": 0.9, "final_top_k": 20,
                    "return_rsa_metadata": True},
    )
    meta = reply.model_extra["rsa_metadata"]
    cfg = meta["config"]
    assert (cfg["population"], cfg["k"], cfg["budget"], cfg["tail"]) == (3, 2, 16, 6)
    assert (cfg["final"], cfg["final_n"], cfg["final_temperature"], cfg["final_top_p"], cfg["final_top_k"]) == (
        "aggregate", 2, 0.3, 0.9, 20)
    assert [r["kind"] for r in meta["rounds"]] == ["initial", "final"], "rsa_t + 1 stages in all"
    assert len(meta["rounds"][-1]["candidates"]) == 2
    assert all(c["tail_tokens"] <= 6 for r in meta["rounds"] for c in r["candidates"])


def test_rsa_object_carries_our_own_names(client):
    reply = client.chat.completions.create(
        model="rsa-smol", messages=HELLO,
        extra_body={"rsa": {"population": 3, "rounds": 0, "final": "population", "budget": 8},
                    "return_rsa_metadata": True},
    )
    assert len(reply.choices) == 3 and reply.model_extra["rsa_metadata"]["config"]["rounds"] == 0


def test_streaming_sends_progress_that_stock_clients_skip(client, served):
    stream = client.chat.completions.create(model="rsa-smol", messages=HELLO, stream=True,
                                            stream_options={"include_usage": True},
                                            extra_body={"extended_compute": True})
    chunks = list(stream)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content.strip()
    assert any(c.choices and c.choices[0].finish_reason for c in chunks)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    with httpx.stream("POST", f"{served}/v1/chat/completions", headers={"Authorization": "Bearer server-token"},
                      json={"messages": HELLO, "stream": True, "extended_compute": True}, timeout=120) as raw:
        lines = [line for line in raw.iter_lines() if line]
    progress = [json.loads(line[len(": rsa "):]) for line in lines if line.startswith(": rsa ")]
    kinds = [p["type"] for p in progress]
    assert kinds[0] == "run_started" and kinds[-1] == "run_finished" and kinds.count("round_finished") == 2
    first_data = next(i for i, line in enumerate(lines) if line.startswith("data:"))
    assert all(line.startswith(": rsa ") for line in lines[:first_data]), "progress comes before the answer"
    assert lines[-1] == "data: [DONE]"


@pytest.mark.parametrize(
    ("extra", "param"),
    [({"rsa_k": 0}, "rsa_k"), ({"rsa_summarize": True}, "rsa_summarize"), ({"use_pacore": True}, "use_pacore"),
     ({"rsa": {"population": "many"}}, "rsa.population"), ({"rsa": {"bogus": 1}}, "rsa.bogus"),
     ({"extended_compute": True, "logprobs": True}, "logprobs"), ({"extended_compute": "yes"}, "extended_compute"),
     ({"extended_compute": True, "n": 3}, "n"), ({"rsa_n": 100000}, "rsa_n"), ({"rsa": {"rounds": 50}}, "rsa.rounds"),
     ({"extended_compute": True, "max_tokens": 10**7}, "max_tokens"),
     ({"rsa": {"candidate_retries": 99}}, "rsa.candidate_retries")],
)
def test_bad_fields_get_an_openai_style_400_naming_the_field(client, extra, param):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="rsa-smol", messages=HELLO, extra_body=extra)
    error = info.value.body
    assert info.value.status_code == 400 and error["param"] == param and param.split(".")[-1] in error["message"]
    assert error["type"] == "invalid_request_error"


def test_wrong_token_is_rejected(served):
    bad = openai.OpenAI(base_url=f"{served}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model="rsa-smol", messages=HELLO)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_missing_token_is_rejected_with_an_openai_error_body(served):
    reply = httpx.post(f"{served}/v1/chat/completions", json={"messages": HELLO})
    assert reply.status_code == 401 and reply.json()["error"]["type"] == "authentication_error"


async def test_concurrent_requests_are_isolated(served):
    client = openai.AsyncOpenAI(base_url=f"{served}/v1", api_key="server-token", max_retries=0)
    replies = await asyncio.gather(*(
        client.chat.completions.create(
            model="rsa-smol", messages=[{"role": "user", "content": f"Say the number {i}."}],
            extra_body={"extended_compute": True, "return_rsa_metadata": True, "seed": 100 + i})
        for i in range(4)
    ))
    seeds = [r.model_extra["rsa_metadata"]["seed"] for r in replies]
    assert seeds == [100, 101, 102, 103]
    await client.close()


def test_client_disconnect_cancels_the_run():
    upstream = FaultServer(delay=1.0)
    with serve_app(upstream.app()) as up:
        backend = OpenAIBackend(f"{up}/v1", model="m", retry=FAST)
        settings = ServerSettings(backend=backend, config=SMALL.replace(population=3, rounds=3))
        with serve_app(create_app(settings)) as url:
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(f"{url}/v1/chat/completions", json={"messages": HELLO, "extended_compute": True},
                           timeout=0.3)
            time.sleep(2.5)
            assert sum(upstream.calls.values()) == 3, "round 1 never started"
            assert upstream.in_flight == 0


def test_serves_the_local_backend_too(smol):
    settings = ServerSettings(backend=smol, config=SMALL)
    with serve_app(create_app(settings)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        plain = client.chat.completions.create(model="x", messages=HELLO, max_tokens=6, temperature=0)
        assert plain.usage.completion_tokens <= 6
        rsa = client.chat.completions.create(model="x", messages=HELLO,
                                             extra_body={"extended_compute": True, "return_rsa_metadata": True})
        assert rsa.model_extra["rsa_metadata"]["rounds"][0]["candidates"][0]["completion_tokens"] <= 24


def test_rsa_serve_command_binds_loopback_and_requires_its_token(upstream):
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "markov_rsa.cli.app", "serve", "--port", str(port), "--base-url", upstream,
         "--model", "smollm2", "--api-key-env", "SERVE_TOKEN", "--preset", "light"],
        env={**__import__("os").environ, "SERVE_TOKEN": "tok-123-abcdefghijkl"}, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        wait_until_up(f"http://127.0.0.1:{port}/health", process=process, timeout=60)
        assert httpx.get(f"http://127.0.0.1:{port}/v1/models").status_code == 401
        ok = httpx.get(f"http://127.0.0.1:{port}/v1/models", headers={"Authorization": "Bearer tok-123-abcdefghijkl"})
        assert ok.status_code == 200
        listening = subprocess.run(["ss", "-ltn"], capture_output=True, text=True).stdout
        assert f"127.0.0.1:{port}" in listening and f"0.0.0.0:{port}" not in listening
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_serve_binds_before_it_says_it_is_serving(tmp_path):
    """A port out of range or in use is one error line (exit 2), never a banner followed by uvicorn's log
    or a traceback; --port 0 announces the port it got."""
    base = [sys.executable, "-m", "markov_rsa", "serve", "--base-url", "http://127.0.0.1:9/v1", "--model", "m"]
    for port in ("99999", "-1"):
        out = subprocess.run([*base, "--port", port], capture_output=True, text=True, timeout=60)
        assert out.returncode == 2 and out.stderr.strip().splitlines() == [f"error: port: must be 0-65535, got {port}"]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        out = subprocess.run([*base, "--port", str(taken.getsockname()[1])], capture_output=True, text=True,
                             timeout=60)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and "cannot listen on 127.0.0.1:" in lines[0], out.stderr
    process = subprocess.Popen([*base, "--port", "0"], stderr=subprocess.PIPE, text=True)
    try:
        banner = process.stderr.readline() if process.stderr else ""
        port = int(banner.split("http://127.0.0.1:")[1].split("/")[0])
        assert port > 0
        wait_until_up(f"http://127.0.0.1:{port}/health", process=process, timeout=60)
    finally:
        process.terminate()
        process.wait(timeout=30)
