"""Rules of the Markovian RSA engine, pinned with a scripted backend (one character = one token)."""

from __future__ import annotations

import asyncio
import re
from collections import Counter

import pytest

from markov_rsa import (
    BackendRequestError,
    BackendUnavailableError,
    Generation,
    MarkovianRSA,
    RSAConfig,
    RSAResult,
)
from markov_rsa.rsa import CandidateFinished, RoundFinished, RunFinished, sample_subsets
from markov_rsa.rsa.prompts import MATH_V1
from tests.doubles import ScriptedBackend, prompt_of

MARK = re.compile(r"<R(\d+)C(\d+)>")


def marked(request, _number):
    """Each reply ends with a marker naming its round and index, so tails reveal their origin."""
    t, i = request.tags["round"], request.tags["index"]
    return f"{'x' * 40} \\boxed{{{i % 3}}} <R{t}C{i}>"


def config(**kw) -> RSAConfig:
    base = {"population": 6, "k": 3, "rounds": 2, "budget": 200, "tail": 60, "seed": 7}
    return RSAConfig(**{**base, **kw})


def untimed(value):
    if isinstance(value, dict):
        return {k: untimed(v) for k, v in value.items() if k != "seconds"}
    if isinstance(value, list):
        return [untimed(v) for v in value]
    return value


async def run(backend, **kw) -> RSAResult:
    return await MarkovianRSA(backend, config(**kw)).solve("What is 1+1?")


async def test_rounds_count_aggregation_stages_after_round_zero():
    backend = ScriptedBackend(marked)
    result = await run(backend, rounds=2)
    assert [r.kind for r in result.rounds] == ["initial", "aggregate", "aggregate"]
    assert len(backend.requests) == 6 * 3
    assert result.usage.requests == 18


async def test_zero_rounds_is_parallel_sampling():
    backend = ScriptedBackend(marked)
    result = await run(backend, rounds=0)
    assert len(result.rounds) == 1
    assert all(prompt_of(r) == MATH_V1.initial.format(problem="What is 1+1?") for r in backend.requests)


async def test_aggregation_draws_k_distinct_tails_from_previous_round_only():
    backend = ScriptedBackend(marked)
    await run(backend, rounds=3)
    for request in backend.requests:
        t = request.tags["round"]
        origins = [(int(r), int(c)) for r, c in MARK.findall(prompt_of(request))]
        if t == 0:
            assert origins == []
            continue
        assert len(origins) == 3
        assert len(set(origins)) == 3, "sampled without replacement"
        assert {r for r, _ in origins} == {t - 1}, "nothing older than the previous round is carried"


async def test_parents_recorded_match_tails_in_prompt():
    backend = ScriptedBackend(marked)
    result = await run(backend, rounds=1)
    by_index = {r.tags["index"]: r for r in backend.requests if r.tags["round"] == 1}
    for cand in result.rounds[1].candidates:
        origins = [int(c) for _, c in MARK.findall(prompt_of(by_index[cand.index]))]
        assert origins == cand.parents, "parents are recorded in the order the prompt presents them"


def test_subsets_are_uniform_without_replacement():
    counts: Counter[int] = Counter()
    draws = 0
    for seed in range(2000):
        for subset in sample_subsets(seed, 1, 8, 8, 4):
            assert len(set(subset)) == 4
            counts.update(subset)
            draws += 4
    expected = draws / 8
    chi2 = sum((counts[i] - expected) ** 2 / expected for i in range(8))
    assert chi2 < 24.3, f"chi-square {chi2:.1f} on 7 dof (p < 0.001): not uniform"
    assert sample_subsets(1, 1, 3, 2, 4) == [[0, 1, 2], [0, 1, 2]], "fewer survivors than K: take all"


async def test_tail_is_last_tau_model_tokens_of_reasoning():
    text = "".join(chr(ord("a") + i % 26) for i in range(150))
    backend = ScriptedBackend(lambda req, n: text)
    result = await run(backend, rounds=1, tail=25, budget=200)
    for cand in result.rounds[0].candidates:
        assert cand.tail == text[-25:]
        assert cand.tail_tokens == 25
    assert text[-25:] in prompt_of(backend.requests[-1])
    assert text[-26:] not in prompt_of(backend.requests[-1])


async def test_tail_equal_to_budget_is_full_chain_rsa():
    text = "y" * 90
    backend = ScriptedBackend(lambda req, n: text)
    result = await run(backend, rounds=1, tail=100, budget=100)
    assert all(c.tail == text and c.tail_tokens == 90 for c in result.rounds[0].candidates)


async def test_k_one_uses_single_candidate_wording():
    backend = ScriptedBackend(marked)
    await run(backend, k=1, rounds=1)
    aggregation = [r for r in backend.requests if r.tags["round"] == 1]
    assert all("Earlier attempt:" in prompt_of(r) for r in aggregation)
    assert all(len(MARK.findall(prompt_of(r))) == 1 for r in aggregation)


async def test_reasoning_tail_comes_from_think_block_and_answer_source_from_answer():
    reply = "<think>" + "r" * 50 + "REASON-END</think>The answer is \\boxed{2}."
    backend = ScriptedBackend(lambda req, n: reply)
    result = await run(backend, rounds=0, tail=10)
    cand = result.rounds[0].candidates[0]
    assert cand.tail == "REASON-END" and cand.answer == "2" and cand.finished
    result = await run(ScriptedBackend(lambda req, n: reply), rounds=0, tail=10, tail_source="answer")
    assert result.rounds[0].candidates[0].tail == "\\boxed{2}."


async def test_hybrid_carries_answer_only_when_finished():
    def reply(req, n):
        if req.tags["index"] % 2:
            return "<think>" + "z" * 30  # truncated inside its reasoning
        return "<think>thinking</think>final \\boxed{5}"

    result = await run(ScriptedBackend(reply), rounds=0, tail=9, budget=60, tail_source="hybrid")
    tails = {c.index: c.tail for c in result.rounds[0].candidates}
    assert tails[0] == "\\boxed{5}" and tails[1] == "z" * 9


async def test_separate_reasoning_field_is_used_for_tail():
    gen = Generation("\\boxed{9}", "stop", 20, 5, reasoning="server-split-reasoning")
    result = await run(ScriptedBackend(lambda req, n: gen), rounds=0, tail=9)
    cand = result.rounds[0].candidates[0]
    assert cand.reasoning == "server-split-reasoning" and cand.tail == "reasoning" and cand.answer == "9"


async def test_truncated_empty_answer_is_a_candidate_not_an_error():
    gen = Generation("", "length", 200, 5, reasoning="long thoughts")
    result = await run(ScriptedBackend(lambda req, n: gen), rounds=1)
    assert all(c.ok and not c.finished and c.answer is None for r in result.rounds for c in r.candidates)


async def test_majority_vote_with_deterministic_tie_break():
    answers = ["7", "5", "5", "7", "3", "3"]  # three-way tie: first seen (7) wins
    backend = ScriptedBackend(lambda req, n: f"\\boxed{{{answers[req.tags['index']]}}}")
    result = await run(backend, rounds=0)
    assert result.answer == "7" and result.votes == 2 and result.selected == (0, 0)


async def test_majority_normalises_equivalent_spellings():
    answers = ["\\dfrac{1}{2}", "\\frac{1}{2}", "3", "025", "25", "25"]
    backend = ScriptedBackend(lambda req, n: f"\\boxed{{{answers[req.tags['index']]}}}")
    result = await run(backend, rounds=0)
    assert result.answer == "025" and result.votes == 3


async def test_aggregate_final_runs_final_n_extra_generations_with_own_temperature():
    backend = ScriptedBackend(marked)
    result = await run(backend, rounds=1, final="aggregate", final_n=3, final_temperature=0.2, temperature=0.9)
    assert [r.kind for r in result.rounds] == ["initial", "aggregate", "final"]
    final = [r for r in backend.requests if r.tags["round"] == 2]
    assert len(final) == 3 and all(r.sampling.temperature == 0.2 for r in final)
    assert all(r.sampling.temperature == 0.9 for r in backend.requests if r.tags["round"] < 2)
    assert result.selected is not None and result.selected[0] == 2


async def test_population_final_returns_everything_and_selects_nothing():
    result = await run(ScriptedBackend(marked), rounds=1, final="population")
    assert result.answer is None and result.selected is None
    assert len(result.population) == 6 and all(c.answer is not None for c in result.population)


async def test_chunked_rollout_carries_head_and_last_m_tokens():
    long = "".join(chr(ord("A") + i % 26) for i in range(500))

    def reply(req, n):
        return long  # never stops on its own: every chunk runs to its length limit

    backend = ScriptedBackend(reply)
    cfg = config(
        population=1, k=1, rounds=0, budget=100, tail=10, chunk_size=30, carryover=8, keep_head=4, max_chunks=3
    )
    result = await MarkovianRSA(backend, cfg).solve("p")
    assert [r.max_tokens for r in backend.requests] == [30, 30, 30]
    assert backend.requests[0].assistant_prefix == ""
    first = long[:30]
    assert backend.requests[1].assistant_prefix == first[:4] + first[-8:]
    assert backend.requests[1].assistant_prefix_ids == tuple(ord(c) for c in first[:4] + first[-8:])
    assert backend.requests[2].assistant_prefix == first[:4] + long[-8 + 30 :][:0] + long[22:30]
    cand = result.rounds[0].candidates[0]
    assert cand.chunks == 3 and cand.usage.completion_tokens == 90 and cand.usage.requests == 3
    assert all(len(r.assistant_prefix) <= 12 for r in backend.requests), "prompt stays bounded"


async def test_chunked_rollout_stops_when_model_stops_and_at_budget():
    backend = ScriptedBackend(lambda req, n: "short \\boxed{1}" if n == 1 else "w" * 100)
    cfg = config(population=1, k=1, rounds=0, budget=100, tail=10, chunk_size=40, carryover=10)
    result = await MarkovianRSA(backend, cfg).solve("p")
    assert len(backend.requests) == 2 and result.answer == "1"
    backend = ScriptedBackend(lambda req, n: "w" * 100)
    await MarkovianRSA(backend, cfg).solve("p")
    assert [r.max_tokens for r in backend.requests] == [40, 40, 20], "budget caps the last chunk"


async def test_same_seed_same_result_and_different_seed_different_subsets():
    a = await run(ScriptedBackend(marked), seed=3)
    b = await run(ScriptedBackend(marked), seed=3)
    c = await run(ScriptedBackend(marked), seed=4)
    assert untimed(a.to_dict()["rounds"]) == untimed(b.to_dict()["rounds"])
    assert [x.parents for x in a.rounds[1].candidates] != [x.parents for x in c.rounds[1].candidates]
    seeds_a = [(x.round, x.index) for x in a.rounds[1].candidates]
    assert seeds_a == [(x.round, x.index) for x in b.rounds[1].candidates]


async def test_request_seeds_do_not_depend_on_scheduling():
    first = ScriptedBackend(marked)
    await run(first, seed=11)
    second = ScriptedBackend(marked, delay=0.001)
    await run(second, seed=11)
    key = lambda b: sorted((r.tags["round"], r.tags["index"], r.sampling.seed) for r in b.requests)  # noqa: E731
    assert key(first) == key(second)


async def test_all_requests_of_a_round_are_in_flight_together():
    backend = ScriptedBackend(marked, delay=0.01)
    await run(backend, population=6)
    assert backend.max_in_flight == 6


async def test_failed_candidate_is_retried_then_recorded_never_dropped():
    def flaky(req, n):
        if req.tags["index"] == 2 and req.tags["round"] == 0:
            return BackendUnavailableError("upstream 503")
        return marked(req, n)

    result = await run(ScriptedBackend(flaky), rounds=1, candidate_retries=2)
    failed = result.rounds[0].candidates[2]
    assert failed.error == "upstream 503" and failed.finish_reason == "error"
    assert len(result.rounds[0].candidates) == 6
    assert all(2 not in c.parents for c in result.rounds[1].candidates), "failed candidates carry nothing"

    attempts = Counter()

    def once(req, n):
        attempts[(req.tags["round"], req.tags["index"])] += 1
        if req.tags["attempt"] == 0 and req.tags["index"] == 1:
            return BackendUnavailableError("blip")
        return marked(req, n)

    result = await run(ScriptedBackend(once), rounds=0)
    assert all(c.ok for c in result.rounds[0].candidates) and attempts[(0, 1)] == 2


async def test_fatal_backend_error_aborts_the_run():
    def fatal(req, n):
        return BackendRequestError("401: check the API key")

    with pytest.raises(BackendRequestError, match="API key"):
        await run(ScriptedBackend(fatal))


async def test_every_candidate_failing_raises_a_clear_error():
    with pytest.raises(BackendUnavailableError, match="all 6 generations of round 0 failed"):
        await run(ScriptedBackend(lambda r, n: BackendUnavailableError("down")), candidate_retries=0)


async def test_token_budget_ends_run_with_best_answer_so_far():
    backend = ScriptedBackend(marked)
    result = await run(backend, rounds=5, token_budget=100)
    assert result.stop_reason == "token_budget"
    assert len(result.rounds) < 6 and result.answer is not None


async def test_time_limit_ends_run_and_cancels_outstanding_requests():
    def slow_after_first(req, n):
        return marked(req, n)

    backend = ScriptedBackend(slow_after_first, delay=0.05)
    result = await run(backend, rounds=50, time_limit=0.2)
    assert result.stop_reason == "time_limit" and result.answer is not None
    assert result.seconds < 2


async def test_closing_the_stream_cancels_outstanding_requests():
    class OneFast(ScriptedBackend):
        async def generate(self, request):
            self.delay = 0 if request.tags["index"] == 0 else 5
            return await super().generate(request)

    backend = OneFast(marked)
    stream = MarkovianRSA(backend, config()).stream("p")
    async for event in stream:
        if isinstance(event, CandidateFinished):
            break
    assert backend.in_flight == 5
    await stream.aclose()
    assert backend.cancelled == 5 and backend.in_flight == 0


async def test_cancelling_the_consumer_cancels_outstanding_requests():
    backend = ScriptedBackend(marked, delay=5)
    consumer = asyncio.create_task(MarkovianRSA(backend, config()).solve("p"))
    while backend.in_flight < 6:
        await asyncio.sleep(0.001)
    consumer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await consumer
    assert backend.cancelled == 6 and backend.in_flight == 0


async def test_event_stream_order():
    events = [e async for e in MarkovianRSA(ScriptedBackend(marked), config(rounds=1)).stream("p")]
    kinds = [type(e).__name__ for e in events]
    assert kinds[0] == "RunStarted" and kinds[-1] == "RunFinished"
    assert kinds.count("RoundStarted") == 2 and kinds.count("RoundFinished") == 2
    assert kinds.count("CandidateFinished") == 12
    finished = [e for e in events if isinstance(e, RoundFinished)]
    assert finished[0].majority is not None and 0 < finished[0].agreement <= 1
    assert all(isinstance(e, CandidateFinished) for e in events[2:8])
    assert isinstance(events[-1], RunFinished)


async def test_result_round_trips_through_json():
    import json

    result = await run(ScriptedBackend(marked), rounds=1)
    again = RSAResult.from_dict(json.loads(result.to_json()))
    assert again.to_dict() == result.to_dict()
    assert again.config == result.config and again.prompts["name"] == "math"


async def test_approximate_tokenizer_is_recorded():
    result = await run(ScriptedBackend(marked, tokenizer="approximate"), rounds=1, tail=5)
    assert result.tails_approximate
    assert all(len(c.tail) == 20 for c in result.rounds[0].candidates)


async def test_one_engine_serves_concurrent_solves():
    backend = ScriptedBackend(marked, delay=0.001)
    engine = MarkovianRSA(backend, config(rounds=1))
    results = await asyncio.gather(*(engine.solve(f"problem {i}") for i in range(5)))
    assert [r.problem for r in results] == [f"problem {i}" for i in range(5)]
    assert len(backend.requests) == 5 * 12


async def test_blocking_solve_inside_an_event_loop_says_to_await_the_engine():
    import warnings

    from markov_rsa import solve

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no coroutine is left un-awaited
        with pytest.raises(RuntimeError, match=r"await MarkovianRSA\(backend, config\)\.solve\(problem\)"):
            solve("p", backend=ScriptedBackend(marked), population=2, k=2, rounds=0, budget=50, tail=10)


async def test_the_time_limit_covers_the_backends_start_up_probe():
    class NeverReady(ScriptedBackend):
        async def ready(self):
            await asyncio.sleep(3600)

    result = await asyncio.wait_for(run(NeverReady(marked), time_limit=0.3), timeout=30)
    assert result.stop_reason == "time_limit" and result.answer is None and result.rounds == []
    assert "before the backend was ready" in result.why_no_answer()
