"""Long rollouts on real servers: streamed generations, exact tails from returned ids, live progress,
cache-aware routing, logs, and malformed replies.

``VLLMLike`` stands in for vLLM in what these tests are about: it streams one token per chunk at a set
rate, splits reasoning into ``reasoning_content``, returns token ids when asked, reports cached prompt
tokens and rejects an over-long prompt with vLLM's 400. llama.cpp's own server covers the streamed path
and routing for real.
"""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field

import pytest
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from markov_rsa import BackendUnavailableError, GenerationRequest, MarkovianRSA, RSAConfig, SamplingParams
from markov_rsa.backends.openai import OpenAIBackend, RetryPolicy
from markov_rsa.backends.retry import parse_retry_after
from markov_rsa.backends.sse import StreamReader
from markov_rsa.rsa.events import CandidateFinished, RoundProgress
from tests.servers import FaultServer, VLLMLike, free_port, llama_server, replica_cache_hits, serve_app
from tests.test_openai_backend import gguf_path

FAST = RetryPolicy(max_attempts=4, initial_backoff=0.01, max_backoff=0.05)
HELLO = ({"role": "user", "content": "Q?"},)


def reasoner(length: int):
    def output(prompt: str, body: dict) -> str:
        return "r" * length + "</think>The answer is \\boxed{7}."
    return output


@pytest.fixture
def served():
    """Start a VLLMLike (or subclass) on loopback; yields a function that returns (server, /v1 url)."""
    stack = []

    def start(server: VLLMLike):
        context = serve_app(server.app())
        url = context.__enter__()
        stack.append(context)
        return server, f"{url}/v1"

    yield start
    for context in reversed(stack):
        context.__exit__(None, None, None)


# -- 1. streaming -------------------------------------------------------------------------------
async def test_a_generation_streaming_for_ten_timeouts_finishes_without_retry(served):
    server, url = served(VLLMLike(reasoner(200), token_rate=50))
    backend = OpenAIBackend(url, model="m", timeout=0.4, retry=FAST)
    gen = await backend.generate(GenerationRequest(HELLO, 1000, SamplingParams(seed=1)))
    await backend.aclose()
    assert gen.finish_reason == "stop" and gen.latency > 10 * 0.4
    assert server.requests["chat"] == 1 and gen.requests == 1 and gen.discarded_tokens == 0
    assert gen.reasoning == "r" * 200 and gen.text == "The answer is \\boxed{7}."


@dataclass
class Stalls(VLLMLike):
    """Streams ``before`` tokens, then goes silent for ``pause`` seconds, on each body's first attempt."""

    before: int = 10
    pause: float = 3.0
    seen: Counter[str] = field(default_factory=Counter)

    async def _chat(self, request: Request) -> Response:
        body = await request.json()
        key = json.dumps(body, sort_keys=True)
        self.seen[key] += 1
        if self.seen[key] > 1:
            return await VLLMLike._serve(self, self.render(body["messages"]), body, completions=False)
        self.requests["chat"] += 1

        async def stall():
            for _ in range(self.before):
                self.generated += 1
                chunk = {"choices": [{"index": 0, "delta": {"reasoning_content": "r"}, "finish_reason": None}]}
                yield f"data: {json.dumps(chunk)}\n\n".encode()
            await asyncio.sleep(self.pause)

        return StreamingResponse(stall(), media_type="text/event-stream")


async def test_a_silent_stream_is_retried_and_its_tokens_still_count(served):
    _, url = served(Stalls(reasoner(30)))
    backend = OpenAIBackend(url, model="m", timeout=0.5, retry=FAST)
    gen = await backend.generate(GenerationRequest(HELLO, 100, SamplingParams(seed=1)))
    await backend.aclose()
    assert gen.requests == 2 and gen.discarded_tokens == 10, "the stalled attempt's tokens were paid for"
    assert gen.completion_tokens == 30 + 1 + len("The answer is \\boxed{7}.")


async def test_the_optional_deadline_bounds_a_whole_request(served):
    _, url = served(VLLMLike(reasoner(400), token_rate=100))
    backend = OpenAIBackend(url, model="m", timeout=5, deadline=0.5,
                            retry=RetryPolicy(max_attempts=2, initial_backoff=0.01))
    with pytest.raises(BackendUnavailableError, match="deadline"):
        await backend.generate(GenerationRequest(HELLO, 1000, SamplingParams(seed=1)))
    await backend.aclose()


async def test_every_run_has_exactly_its_generations_and_the_servers_usage(served):
    server, url = served(VLLMLike(reasoner(40)))
    backend = OpenAIBackend(url, model="m", retry=FAST)
    config = RSAConfig(population=5, k=2, rounds=2, budget=200, tail=16, seed=3, final="aggregate", final_n=2)
    result = await MarkovianRSA(backend, config).solve("What is 3 + 4?")
    await backend.aclose()
    generations = server.requests["chat"]
    assert generations == 5 * 3 + 2 == result.usage.requests
    seeds = [b["seed"] for b in server.bodies]
    assert len(seeds) == len(set(seeds)), "no generation was sent twice"
    assert result.usage.completion_tokens + result.usage.discarded_tokens == server.generated
    assert result.usage.prompt_tokens == server.prompt_tokens


# -- 2. exact tails without extra round trips ---------------------------------------------------
@pytest.mark.parametrize(("reasoning", "per_candidate"), [(12, 1), (80, 2)])
async def test_tails_come_from_returned_ids(served, reasoning, per_candidate):
    """Requests per candidate: 1 when the reasoning fits in τ (its ids say so), 2 when it must be cut
    (one detokenize of the last τ ids); never a tokenize call."""
    server, url = served(VLLMLike(reasoner(reasoning)))
    backend = OpenAIBackend(url, model="m", retry=FAST)
    await backend.ready()
    before = Counter(server.requests)
    config = RSAConfig(population=4, k=2, rounds=1, budget=400, tail=30, seed=1)
    result = await MarkovianRSA(backend, config).solve("Q?")
    await backend.aclose()
    used = Counter(server.requests)
    used.subtract(before)
    candidates = 8
    assert used["tokenize"] == 0
    assert (used["chat"] + used["detokenize"]) / candidates == per_candidate
    for candidate in result.rounds[0].candidates:
        assert candidate.tail == "r" * min(reasoning, 30) and candidate.tail_tokens == min(reasoning, 30)


# -- 3. live progress ---------------------------------------------------------------------------
async def test_progress_events_show_a_long_round_moving(served):
    _, url = served(VLLMLike(reasoner(120), token_rate=100))
    backend = OpenAIBackend(url, model="m", retry=FAST)
    engine = MarkovianRSA(backend, RSAConfig(population=3, k=2, rounds=0, budget=400, tail=16, seed=1),
                          progress_interval=0.2)
    progress = []
    async for event in engine.stream("Q?"):
        if isinstance(event, RoundProgress):
            progress.append(event.tokens)
        elif isinstance(event, CandidateFinished):
            break
    await backend.aclose()
    assert len(progress) >= 3 and progress == sorted(progress) and progress[-1] > progress[0] > 0


async def test_rsa_solve_status_line_shows_streamed_tokens(served):
    """The terminal status line (what a user watching a long round sees) moves with streamed counts."""
    import io

    from rich.console import Console

    from markov_rsa.cli.render import follow

    _, url = served(VLLMLike(reasoner(150), token_rate=100))
    backend = OpenAIBackend(url, model="m", retry=FAST)
    screen = io.StringIO()
    console = Console(file=screen, force_terminal=True, width=120)
    engine = MarkovianRSA(backend, RSAConfig(population=2, k=2, rounds=0, budget=400, tail=16, seed=1),
                          progress_interval=0.2)
    result = await follow(engine.stream("Q?"), console)
    await backend.aclose()
    assert result.answer == "7"
    assert "tokens so far" in screen.getvalue()


# -- 4. cache-aware routing ---------------------------------------------------------------------
async def test_affinity_keeps_a_run_on_one_replica_and_raises_prefix_cache_hits():
    problems = [f"Problem {i}: " + "a long statement of the problem " * 24 for i in range(3)]
    with_affinity, _ = await replica_cache_hits(True, problems)
    without, _ = await replica_cache_hits(False, problems)
    # The prompt tokens a server must compute (cache misses) fall by a quarter or more.
    assert (1 - with_affinity) < 0.75 * (1 - without), (with_affinity, without)
    _, placement = await replica_cache_hits(True, problems, concurrent=False)
    for counts in placement:
        assert sorted(counts.values())[-1] == sum(counts.values()), "each run stayed on one replica"


async def test_affinity_gives_way_when_its_replica_is_out_of_rotation():
    alive = FaultServer()
    dead = FaultServer(faults=lambda body: ["503"] * 100)
    with serve_app(alive.app()) as a, serve_app(dead.app()) as b:
        backend = OpenAIBackend([f"{a}/v1", f"{b}/v1"], model="m", retry=FAST)
        config = RSAConfig(population=6, k=2, rounds=1, budget=100, tail=20, seed=2)
        results = await asyncio.gather(*(MarkovianRSA(backend, config).solve(f"problem {i}") for i in range(4)))
        await backend.aclose()
    assert all(c.ok for r in results for rr in r.rounds for c in rr.candidates)


async def test_llama_cpp_replicas_serve_one_run_from_a_warm_cache():
    import httpx

    def prompt_tokens(url: str) -> float:
        metrics = httpx.get(url.removesuffix("/v1") + "/metrics", timeout=10).text
        line = next(x for x in metrics.splitlines() if x.startswith("llamacpp:prompt_tokens_total"))
        return float(line.split()[-1])

    with llama_server(gguf_path(), slots=4) as first, llama_server(gguf_path(), slots=4) as second:
        backend = OpenAIBackend([first, second], model="smollm2", retry=FAST)
        config = RSAConfig(population=4, k=2, rounds=1, budget=24, tail=8, seed=0)
        result = await MarkovianRSA(backend, config).solve("Name three colours. " * 8)
        await backend.aclose()
        prefilled = sorted(prompt_tokens(url) for url in (first, second))
    assert prefilled[0] == 0 < prefilled[1], f"one run's generations went to one replica: {prefilled}"
    assert result.usage.cached_tokens > 0, "llama.cpp reported prefix-cache hits"
    assert all(c.ok for r in result.rounds for c in r.candidates)


# -- 5. logs ------------------------------------------------------------------------------------
def test_commands_log_retries_to_a_file_and_never_the_key(tmp_path):
    server = FaultServer(faults=lambda body: ["503", "429"], reply=lambda body: "1 + 1 = \\boxed{2}")
    log = tmp_path / "rsa.log"
    with serve_app(server.app()) as url:
        out = subprocess.run(
            [sys.executable, "-m", "markov_rsa.cli.app", "solve", "What is 1+1?", "--base-url", f"{url}/v1",
             "--model", "m", "--population", "2", "--rounds", "0", "--budget", "50", "--tail", "10",
             "--api-key-env", "RSA_TEST_KEY", "--log-level", "debug", "--log-file", str(log)],
            capture_output=True, text=True, timeout=120,
            env={**__import__("os").environ, "RSA_TEST_KEY": "sk-never-logged-1234"},
        )
    assert out.returncode == 0, out.stderr
    text = log.read_text()
    assert "attempt 1 failed" in text and "HTTP 503" in text and "retrying in" in text
    assert "DEBUG markov_rsa.backends.openai" in text
    assert "sk-never-logged-1234" not in text + out.stderr + out.stdout
    bad = subprocess.run([sys.executable, "-m", "markov_rsa.cli.app", "report", str(tmp_path), "--log-level", "loud"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "log_level" in bad.stderr and "Traceback" not in bad.stderr


async def test_replica_ejection_is_logged_as_a_warning(caplog):
    alive = FaultServer()
    dead = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    with serve_app(alive.app()) as b, caplog.at_level(logging.DEBUG, "markov_rsa"):
        backend = OpenAIBackend([dead, f"{b}/v1"], model="m", retry=FAST, affinity=False)
        await MarkovianRSA(backend, RSAConfig(population=6, k=2, rounds=0, budget=50, tail=10, seed=0)).solve("p")
        await backend.aclose()
    assert any(r.levelno == logging.WARNING and "out of rotation" in r.getMessage() for r in caplog.records)


# -- 6. malformed replies -----------------------------------------------------------------------
def test_retry_after_in_any_form_never_crashes():
    assert parse_retry_after("soon") is None and parse_retry_after("") is None
    assert parse_retry_after("2.5") == 2.5 and parse_retry_after("-3") == 0.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0


class Odd(FaultServer):
    """Replies that are malformed in one way each, on a body's first call."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode

    seen = 0

    async def _generate(self, request: Request) -> Response:
        body = await request.json()
        self.seen += 1
        first = self.seen == 1
        if self.mode == "retry-after-soon" and first:
            return JSONResponse({"error": {"message": "busy"}}, status_code=429, headers={"Retry-After": "soon"})
        if self.mode == "non-object-choice" and first:
            return StreamingResponse(iter([b'data: {"choices": ["oops"]}\n\n']), media_type="text/event-stream")
        if self.mode == "no-done-but-finished":
            chunks = [{"choices": [{"index": 0, "delta": {"content": "\\boxed{5}"}, "finish_reason": None}]},
                      {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}]
            return StreamingResponse(iter([f"data: {json.dumps(c)}\n\n".encode() for c in chunks]),
                                     media_type="text/event-stream")
        if self.mode == "non-numeric-usage":
            chunks = [{"choices": [{"index": 0, "delta": {"content": "\\boxed{5}"}, "finish_reason": "stop"}]},
                      {"choices": [], "usage": {"completion_tokens": "many", "prompt_tokens": None}}]
            body_bytes = b"".join(f"data: {json.dumps(c)}\n\n".encode() for c in chunks) + b"data: [DONE]\n\n"
            return Response(body_bytes, media_type="text/event-stream")
        return await super()._generate_from(body)


@pytest.mark.parametrize("mode", ["retry-after-soon", "non-object-choice", "no-done-but-finished",
                                  "non-numeric-usage"])
async def test_malformed_replies_are_retried_or_read_never_a_crash(mode):
    server = Odd(mode)
    with serve_app(server.app()) as url:
        backend = OpenAIBackend(f"{url}/v1", model="m", retry=FAST)
        gen = await backend.generate(GenerationRequest(HELLO, 50, SamplingParams(seed=4)))
        await backend.aclose()
    assert gen.finish_reason == "stop" and gen.completion_tokens > 0
    if mode in ("retry-after-soon", "non-object-choice"):
        assert gen.requests == 2


def test_a_stream_cut_before_its_finish_is_malformed():
    reader = StreamReader()
    reader.feed_line('data: {"choices": [{"index": 0, "delta": {"content": "hal"}, "finish_reason": null}]}')
    with pytest.raises(Exception, match="ended before"):
        reader.result(0.0)


async def test_an_over_long_prompt_gets_vllms_400_as_a_clear_error(served):
    from markov_rsa import BackendRequestError

    _, url = served(VLLMLike(reasoner(10), max_model_len=50))
    backend = OpenAIBackend(url, model="m", retry=FAST)
    with pytest.raises(BackendRequestError, match="maximum context length is 50"):
        await backend.generate(GenerationRequest(HELLO, 100, SamplingParams(seed=1)))
    await backend.aclose()
