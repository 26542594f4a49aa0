"""The remote backend against servers that queue: a wait for a slot is not silence, busy is not dead."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
import time

import pytest

from markov_rsa import GenerationRequest, MarkovianRSA, RSAConfig
from markov_rsa.backends.openai import OpenAIBackend, RetryPolicy
from markov_rsa.backends.sse import MalformedReply, StreamReader
from markov_rsa.errors import BackendRequestError, BackendUnavailableError
from tests.servers import FaultServer, QueueingServer, serve_app

FAST = RetryPolicy(max_attempts=3, initial_backoff=0.01, max_backoff=0.05, cooldown=5)


def req(seed: int, key: str | None = None) -> GenerationRequest:
    from markov_rsa import SamplingParams

    return GenerationRequest(messages=({"role": "user", "content": "What is 1+1?"},), max_tokens=50,
                             sampling=SamplingParams(seed=seed), affinity=key)


async def test_a_queued_request_is_not_silence_and_no_busy_replica_is_ejected():
    """One slot, 4 requests of 0.6 s each, --timeout 0.5: the last waits 1.8 s for its slot, sending
    nothing, and must neither be cancelled nor retried."""
    server = QueueingServer(slots=1, duration=0.6)
    with serve_app(server.app()) as url:
        backend = OpenAIBackend(f"{url}/v1", model="queued-model", timeout=0.5, retry=FAST)
        gens = await asyncio.gather(*(backend.generate(req(i)) for i in range(4)))
        await backend.aclose()
    assert all(g.finish_reason == "stop" for g in gens)
    assert backend.stats["retries"] == 0 and server.served == 4, (backend.stats, server.served)
    assert max(server.waits) > 1.0, "the last request really queued beyond the timeout"
    assert server.health_checks >= 1, "the wait was judged by the server's health, not by silence"
    assert all(e["healthy"] for e in backend.endpoints)


async def test_a_stopped_server_is_still_detected_while_a_request_waits():
    """A server that stops answering anything (SIGSTOP) while a request waits for its first byte fails
    that attempt within a few timeouts, not never."""
    server = QueueingServer(slots=1, duration=0.2)
    with serve_app(server.app()) as url:
        backend = OpenAIBackend(f"{url}/v1", model="queued-model", timeout=0.4,
                                retry=RetryPolicy(max_attempts=1))
        await backend.ready()
        server.frozen = True
        start = time.monotonic()
        try:
            await backend.generate(req(0))
        except BackendUnavailableError as exc:
            message = str(exc)
        else:
            raise AssertionError("a frozen server answered")
        finally:
            server.frozen = False
            await backend.aclose()
    assert time.monotonic() - start < 5 and "health" in message, message


async def test_timeout_bounds_the_connect():
    """A black-holed address (a listening socket that never accepts, backlog full) times out after
    --timeout, not a fixed 10 s."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    fillers = []
    port = listener.getsockname()[1]
    for _ in range(8):  # fill the accept backlog so that further connects hang
        s = socket.socket()
        s.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            s.connect(("127.0.0.1", port))
        fillers.append(s)
    backend = OpenAIBackend(f"http://127.0.0.1:{port}/v1", model="m", timeout=0.5, retry=RetryPolicy(max_attempts=1))
    assert backend.timeouts.connect == 0.5
    start = time.monotonic()
    with pytest.raises(BackendUnavailableError, match="timed out"):
        await backend.router.call("/models", {}, attempts=1)
    elapsed = time.monotonic() - start
    await backend.aclose()
    for s in fillers:
        s.close()
    listener.close()
    assert elapsed < 3, elapsed


async def test_a_run_on_a_queueing_server_wastes_no_attempt():
    server = QueueingServer(slots=2, duration=0.3)
    with serve_app(server.app()) as url:
        backend = OpenAIBackend(f"{url}/v1", model="queued-model", timeout=0.4, retry=FAST)
        config = RSAConfig(population=6, k=2, rounds=1, budget=50, tail=10, seed=0)
        result = await MarkovianRSA(backend, config).solve("What is 1+1?")
        await backend.aclose()
    assert all(c.ok for r in result.rounds for c in r.candidates)
    assert backend.stats["retries"] == 0, backend.stats


async def test_retries_back_off_across_replicas_too():
    """Two replicas answering 503: the attempts of one request are spaced by the backoff, not sent
    milliseconds apart until both replicas are ejected."""
    times: list[float] = []

    def record(body: dict) -> float:
        times.append(time.monotonic())
        return 0.0

    servers = [FaultServer(faults=lambda body: ["503"] * 2, delay=record) for _ in range(2)]
    policy = RetryPolicy(max_attempts=6, initial_backoff=0.2, max_backoff=1.0, eject_after=10)
    with serve_app(servers[0].app()) as a, serve_app(servers[1].app()) as b:
        backend = OpenAIBackend([f"{a}/v1", f"{b}/v1"], model="m", retry=policy)
        await backend.ready()
        times.clear()
        gen = await backend.generate(req(1))
        await backend.aclose()
    assert gen.finish_reason == "stop"
    gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
    assert len(times) >= 3 and min(gaps) >= 0.1, gaps


async def test_malformed_tokenizer_replies_fail_one_tail_not_the_run():
    """A 200 from /tokenize with {"detail": ...} or [] is an error the engine survives (that tail is
    approximate), not a KeyError or AttributeError that ends the run."""
    from starlette.responses import JSONResponse

    for reply in ({"detail": "tokenizer unavailable"}, []):
        server = FaultServer()
        app = server.app()
        calls = {"n": 0}

        async def tokenize(request, reply=reply, calls=calls):
            calls["n"] += 1
            body = await request.json()
            if calls["n"] <= 2:  # the probe: an honest tokenizer
                return JSONResponse({"tokens": [ord(c) for c in body["prompt"]]})
            return JSONResponse(reply)

        app.router.routes = [r for r in app.router.routes if getattr(r, "path", "") != "/tokenize"]
        app.add_route("/tokenize", tokenize, methods=["POST"])
        with serve_app(app) as url:
            backend = OpenAIBackend(f"{url}/v1", model="m", retry=FAST)
            with pytest.raises(BackendRequestError, match="no token list"):
                await backend.tokenize("some text")
            config = RSAConfig(population=2, k=2, rounds=1, budget=50, tail=10, seed=0)
            result = await MarkovianRSA(backend, config).solve("What is 1+1?")
            await backend.aclose()
        assert all(c.ok for r in result.rounds for c in r.candidates)


def test_a_deeply_nested_chunk_is_a_malformed_reply_not_a_crash():
    reader = StreamReader()
    with pytest.raises(MalformedReply):
        reader.feed_line("data: " + "[" * 100_000 + "]" * 100_000)


async def routed_run(routing: str, *, metrics: bool = True) -> tuple[float, list[QueueingServer]]:
    """One run (population 6) over three replicas of 2 slots each; its wall time and the servers."""
    servers = [QueueingServer(slots=2, duration=0.3, prefill=0.1, metrics=metrics) for _ in range(3)]
    with contextlib.ExitStack() as stack:
        urls = [f"{stack.enter_context(serve_app(s.app()))}/v1" for s in servers]
        backend = OpenAIBackend(urls, model="queued-model", routing=routing, retry=FAST)  # type: ignore[arg-type]
        await backend.ready()
        start = time.monotonic()
        config = RSAConfig(population=6, k=2, rounds=1, budget=50, tail=10, seed=0)
        result = await MarkovianRSA(backend, config).solve("What is 1+1?")
        elapsed = time.monotonic() - start
        await backend.aclose()
    assert all(c.ok for r in result.rounds for c in r.candidates)
    return elapsed, servers


async def test_affinity_never_leaves_a_replica_idle_while_another_queues():
    """Where servers say their slot count, a run's requests stay with its replica only while it has a
    free slot: every replica works, and the prefix is still found cached on most requests."""
    _, servers = await routed_run("affinity")
    assert all(s.served > 0 for s in servers), [s.served for s in servers]
    assert max(max(s.waits) for s in servers) < 0.25, "no request sat in a queue while a slot was free"
    _, least = await routed_run("least-busy")
    assert sum(s.cache_hits for s in servers) >= sum(s.cache_hits for s in least)


def test_routing_is_validated():
    with pytest.raises(BackendRequestError, match="routing"):
        OpenAIBackend("http://127.0.0.1:1/v1", model="m", routing="round-robin")  # type: ignore[arg-type]


def test_routing_flag_reaches_the_backend_and_is_refused_where_it_does_nothing():
    from markov_rsa.backends.factory import BackendOptions, build_backend
    from markov_rsa.errors import ConfigError

    backend = build_backend(BackendOptions(base_url=("http://127.0.0.1:1/v1",), model="m", routing="least-busy"))
    assert isinstance(backend, OpenAIBackend) and backend.router.pool.routing == "least-busy"
    with pytest.raises(ConfigError, match="routing"):
        build_backend(BackendOptions(routing="least-busy"), announce=False)


async def test_a_template_opened_think_is_learnt_without_a_tokenize_endpoint():
    """No tokenize endpoint, so the probe cannot render the template; a reply that closes a <think> it
    never opened shows the template opens one, and later replies cut before </think> are marked as
    unfinished reasoning (think_opened), so they never vote."""
    replies = iter(["reasoning...</think>The answer is \\boxed{4}.", "still reasoning, cut off"])
    server = FaultServer(tokenizer=False, reply=lambda body: next(replies))
    with serve_app(server.app()) as url:
        backend = OpenAIBackend(f"{url}/v1", model="m", retry=FAST)
        first = await backend.generate(req(0))
        second = await backend.generate(req(1))
        await backend.aclose()
    assert first.think_opened and second.think_opened


async def test_without_a_model_name_the_only_served_model_is_used():
    server = QueueingServer(slots=2, duration=0.05)
    with serve_app(server.app()) as url:
        backend = OpenAIBackend(f"{url}/v1", retry=FAST)
        gen = await backend.generate(req(0))
        await backend.aclose()
    assert backend.model == "queued-model" and backend.info.model == "queued-model" and gen.finish_reason == "stop"


def test_cli_without_model_lists_what_the_server_serves():
    import subprocess
    import sys

    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def models(request):
        return JSONResponse({"object": "list", "data": [{"id": "alpha"}, {"id": "beta"}]})

    with serve_app(Starlette(routes=[Route("/v1/models", models)])) as url:
        out = subprocess.run([sys.executable, "-m", "markov_rsa.cli.app", "solve", "2+2?", "--base-url", f"{url}/v1"],
                             capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "alpha, beta" in out.stderr and "--model" in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr


async def test_a_failed_generation_says_what_it_cost():
    """Every attempt is a request sent: a generation that fails for good carries its attempts and the tokens
    its cut streams had delivered, and a successful one counts its retries."""
    server = FaultServer(faults=lambda body: ["cut"] * 3 if body.get("seed") == 1 else ["503"])
    with serve_app(server.app()) as url:
        backend = OpenAIBackend(f"{url}/v1", model="m", retry=FAST)
        ok = await backend.generate(req(0))
        with pytest.raises(BackendUnavailableError) as failed:
            await backend.generate(req(1))
        await backend.aclose()
    assert ok.requests == 2
    assert failed.value.attempts == 3 and failed.value.discarded_tokens == 3
