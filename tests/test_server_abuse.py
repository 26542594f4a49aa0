"""`rsa serve` against clients that misbehave and upstreams that fail: every cost a client controls is
bounded, client input never causes a 500, upstream errors keep their meaning and none of the upstream's
text reaches a client.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
import uvicorn

from markov_rsa import RSAConfig
from markov_rsa.backends.openai import OpenAIBackend, RetryPolicy
from markov_rsa.server import ServerLimits, ServerSettings, create_app
from markov_rsa.server.privacy import scrub
from markov_rsa.server.run import uvicorn_config
from tests.doubles import ScriptedBackend
from tests.servers import AgentUpstream, serve_app

FAST = RetryPolicy(max_attempts=2, initial_backoff=0.01, max_backoff=0.02)
SMALL = RSAConfig(population=2, k=2, rounds=1, budget=64, tail=16, seed=0, task="math", preset="small")
HELLO = [{"role": "user", "content": "What is 2 + 2?"}]


def scripted(**limits: Any) -> ServerSettings:
    backend = ScriptedBackend(lambda request, number: "The answer is \\boxed{4}.")
    return ServerSettings(backend=backend, config=SMALL, limits=ServerLimits(**limits))


@contextlib.contextmanager
def guarded(settings: ServerSettings) -> Iterator[tuple[str, uvicorn.Server]]:
    """The app under the uvicorn configuration ``rsa serve`` uses, on a free loopback port."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn_config(create_app(settings), settings.limits, drain_seconds=1,
                                           log_level="critical"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", server
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def closed_by_server(sock: socket.socket, within: float) -> bool:
    sock.settimeout(within)
    try:
        return sock.recv(1024) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


# -- slow and greedy clients ----------------------------------------------------------------------
def test_half_sent_requests_are_closed_and_connections_are_capped():
    settings = scripted(header_seconds=0.5, max_connections=30)
    with guarded(settings) as (url, server):
        port = int(url.rsplit(":", 1)[1])
        slow = []
        for _ in range(80):
            sock = socket.create_connection(("127.0.0.1", port))
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # never finished
            slow.append(sock)
        time.sleep(0.1)
        assert len(server.server_state.connections) <= 30, "connections beyond the cap are closed at once"
        closed = sum(closed_by_server(sock, 2.0) for sock in slow)
        assert closed == 80, "every half-sent request is closed: beyond the cap at once, the rest after 0.5s"
        assert httpx.get(f"{url}/health", timeout=2).status_code == 200
        for sock in slow:
            sock.close()


def test_a_body_that_never_finishes_is_a_408():
    with guarded(scripted(body_seconds=0.5)) as (url, _):
        port = int(url.rsplit(":", 1)[1])
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{\"messages\"")
        sock.settimeout(5)
        assert sock.recv(1024).startswith(b"HTTP/1.1 408")
        sock.close()


# -- client input never causes a 500 --------------------------------------------------------------
@pytest.mark.parametrize("raw", [b"[" * 100_000 + b"]" * 100_000,
                                 b'{"messages": [{"role": "user", "content": "hi"}], "temperature": 1e400}',
                                 b'{"messages": [{"role": "user", "content": "hi"}], "extended_compute": true, '
                                 b'"temperature": -1e999}'])
def test_hostile_json_is_a_400(raw):
    with serve_app(create_app(scripted())) as url:
        reply = httpx.post(f"{url}/v1/chat/completions", content=raw, headers={"Content-Type": "application/json"})
    assert reply.status_code == 400 and reply.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("host", ["[::1]evil.com", "[::1]:80evil", "localhost:evil", "127.0.0.1.evil.com"])
def test_a_host_that_only_starts_like_loopback_is_refused(host):
    with serve_app(create_app(scripted())) as url:
        reply = httpx.post(f"{url}/v1/chat/completions", json={"messages": HELLO}, headers={"Host": host})
    assert reply.status_code == 403


def test_unknown_routes_and_wrong_methods_get_openai_error_bodies():
    with serve_app(create_app(scripted())) as url:
        missing = httpx.get(f"{url}/v1/nothing-here")
        wrong = httpx.get(f"{url}/v1/chat/completions")
        served = openai.OpenAI(base_url=f"{url}/v1", api_key="x").models.retrieve("markov-rsa")
        with pytest.raises(openai.NotFoundError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0).models.retrieve("other")
    assert served.id == "markov-rsa"
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"
    assert wrong.status_code == 405 and "GET" in wrong.json()["error"]["message"]


# -- amplification is bounded ---------------------------------------------------------------------
def test_tiny_chunks_and_huge_prompts_cannot_amplify_a_request():
    with serve_app(create_app(scripted(max_upstream_bytes_per_run=2**20))) as url:
        chunks = httpx.post(f"{url}/v1/chat/completions", json={
            "messages": HELLO, "rsa": {"population": 16, "budget": 300, "tail": 16, "chunk_size": 1}})
        big = httpx.post(f"{url}/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "x" * 200_000}], "rsa": {"population": 16}})
    assert chunks.status_code == 400 and chunks.json()["error"]["param"] == "rsa.chunk_size"
    assert big.status_code == 400 and big.json()["error"]["param"] == "messages"


# -- upstream errors keep their meaning, and none of the upstream's text -----------------------------
@pytest.mark.parametrize(("status", "error"), [(404, openai.NotFoundError), (429, openai.RateLimitError)])
def test_upstream_404_and_429_keep_their_meaning_in_rsa_mode(status, error):
    upstream = AgentUpstream(status=status)
    with serve_app(upstream.app()) as up:
        backend = OpenAIBackend(f"{up}/v1", model="agent-model", retry=FAST)
        settings = ServerSettings(backend=backend, config=SMALL.replace(candidate_retries=0))
        with serve_app(create_app(settings)) as url:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
            with pytest.raises(error) as info:
                client.chat.completions.create(model="m", messages=HELLO, extra_body={"extended_compute": True})
    text = str(info.value.body)
    assert "10.1.2.3" not in text and "127.0.0.1" not in text
    if status == 429:
        assert info.value.response.headers["retry-after"]


def test_progress_and_metadata_carry_no_upstream_text():
    upstream = AgentUpstream(status=500)
    with serve_app(upstream.app()) as up:
        backend = OpenAIBackend(f"{up}/v1", model="agent-model", retry=FAST)
        settings = ServerSettings(backend=backend, config=SMALL.replace(candidate_retries=0))
        with serve_app(create_app(settings)) as url:
            streamed = httpx.post(f"{url}/v1/chat/completions", timeout=30, json={
                "messages": HELLO, "stream": True, "extended_compute": True, "return_rsa_metadata": True})
    assert "candidate_finished" in streamed.text and "HTTP 500" in streamed.text
    for leak in ("10.1.2.3", "127.0.0.1", up.rsplit(":", 1)[1], "says 500"):
        assert leak not in streamed.text


@pytest.mark.parametrize("text", [
    "http://10.0.0.5:8000/v1 said no", "gpu-7.cluster.internal:8000 refused", "[fe80::1]:9000 refused",
    "fe80::1ff:fe23:4567:890a down", "model at /srv/models/zaya.gguf missing", "localhost:8000 closed",
])
def test_the_scrubber_removes_addresses_host_names_and_paths(text):
    cleaned = scrub(text)
    for leak in ("10.0.0.5", "gpu-7", "cluster", "fe80", "/srv", "zaya.gguf", "localhost", "8000", "9000"):
        assert leak not in cleaned
