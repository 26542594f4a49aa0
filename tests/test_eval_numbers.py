"""Eval numbers that stay right when runs are imperfect: failures, limits, repeats, small samples.

Runs go through the real runner over a scripted backend (one character is one token) or a loopback
server with scripted faults; grading compares with the gold answer exactly, so every expected
number can be worked out by hand.
"""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path

import pytest

from markov_rsa import RSAConfig
from markov_rsa.backends.base import Generation, GenerationRequest
from markov_rsa.errors import BackendError
from markov_rsa.evals.benchmarks import load_task
from markov_rsa.evals.datasets import Problem
from markov_rsa.evals.intervals import clopper_pearson, interval_units
from markov_rsa.evals.log import read_jsonl, read_problems
from markov_rsa.evals.metrics import summarise
from markov_rsa.evals.report import load_run, results_table, rounds_table, run_json
from markov_rsa.evals.runner import EvalSpec, Evaluation
from tests.conftest import DATASETS
from tests.doubles import ScriptedBackend


class ExactGrader:
    """Right when the answer is the gold string (no worker processes: these tests are about counting)."""

    async def grade_problem(self, answer: str | None, problem: Problem) -> bool:
        return answer is not None and answer.strip() == problem.answer

    def close(self) -> None:
        return None


def problems(count: int) -> list[Problem]:
    return load_task("aime25", DATASETS)[:count]


def evaluate(spec: EvalSpec, backend, items: list[Problem], out: Path):
    return asyncio.run(Evaluation(spec, backend, items, out, math_grader=ExactGrader()).run())  # type: ignore[arg-type]


def gold_of(text: str, items: list[Problem]) -> str:
    """The gold answer of the problem whose statement is in a prompt."""
    return next(p.answer for p in items if p.problem[:60] in text)


# -- 1. the denominator is the planned set ----------------------------------------------------
def prompt_text(request: GenerationRequest) -> str:
    return "\n".join(str(m["content"]) for m in request.messages)


def test_a_problem_that_fails_upstream_scores_wrong_over_the_planned_set_and_is_retried(tmp_path):
    items = problems(6)
    broken = items[2].problem[:60]
    down = {"on": True}

    def respond(request: GenerationRequest, number: int):
        text = prompt_text(request)
        if down["on"] and broken in text:
            return BackendError("HTTP 500 after retries")
        return f"Done. \\boxed{{{gold_of(text, items)}}}"

    backend = ScriptedBackend(respond)
    spec = EvalSpec("aime25", RSAConfig(population=2, k=2, rounds=0, budget=60, tail=10, seed=1,
                                        candidate_retries=0))
    progress = evaluate(spec, backend, items, tmp_path)
    assert len(progress.failed) == 1
    run = load_run(tmp_path)
    assert json.loads((tmp_path / "run.json").read_text())["plan"] == [p.id for p in items]
    data = run_json(run)
    assert data["planned"] == 6 and data["finished"] == 5 and data["failed"] == 1
    assert data["metrics"]["final"]["value"] == pytest.approx(5 / 6), "not 5/5: the failure scores wrong"
    assert data["metrics"]["avg_at_n"]["value"] == pytest.approx(5 / 6)
    row = dict(zip(*results_table([run]), strict=True))
    assert row["problems"] == "6 (5 finished)" and "1 failed (scored wrong)" in row["incomplete"]
    assert row["final"].startswith("83.3 [")
    from rich.console import Console

    from markov_rsa.cli.show import show_run

    console = Console(record=True, width=120)
    show_run(tmp_path, None, console)
    shown = console.export_text()
    assert "failed" in shown and shown.index("aime_2025_I_2") < shown.index("aime_2025_I_3")
    down["on"] = False  # the endpoint recovers: the resume retries the failed problem, and only it
    before = len(backend.requests)
    evaluate(spec, backend, items, tmp_path)
    retried = [prompt_text(r) for r in backend.requests[before:]]
    assert retried and all(broken in text for text in retried)
    data = run_json(load_run(tmp_path))
    assert data["finished"] == 6 and data["failed"] == 0 and data["metrics"]["final"]["value"] == 1.0


def test_a_run_with_nothing_finished_prints_no_number(tmp_path):
    items = problems(3)
    backend = ScriptedBackend(lambda request, n: BackendError("down"))
    spec = EvalSpec("aime25", RSAConfig(population=2, k=2, rounds=0, budget=60, tail=10, seed=1,
                                        candidate_retries=0))
    evaluate(spec, backend, items, tmp_path)
    run = load_run(tmp_path)
    data = run_json(run)
    assert data["finished"] == 0 and data["failed"] == 3
    assert all(m == {"value": None, "low": None, "high": None} for m in data["metrics"].values())
    row = dict(zip(*results_table([run]), strict=True))
    assert row["avg@N"] == row["final"] == "–" and "3 failed" in row["incomplete"]


# -- 2. failed generations are not wrong answers ---------------------------------------------------
def test_failed_generations_are_counted_apart_and_retried_on_resume(tmp_path):
    items = problems(3)
    broken = {"on": True}

    def respond(request: GenerationRequest, number: int):
        seed = request.sampling.seed or 0
        if broken["on"] and seed % 3 == 0:
            return BackendError("upstream gave up")
        gold = gold_of(prompt_text(request), items)
        return f"ok \\boxed{{{gold if seed % 2 else 0}}}"

    backend = ScriptedBackend(respond)
    spec = EvalSpec("aime25", RSAConfig(population=6, k=2, rounds=0, budget=60, tail=10, seed=2,
                                        candidate_retries=0))
    evaluate(spec, backend, items, tmp_path)
    records = read_problems(tmp_path / "problems.jsonl")
    failed = sum(r.failed_generations for r in records)
    assert failed > 0
    candidates = list(read_jsonl(tmp_path / "candidates.jsonl"))
    ran = [c for c in candidates if not c["error"]]
    expected_avg = sum(
        sum(c["correct"] for c in ran if c["problem_id"] == p.id) / sum(1 for c in ran if c["problem_id"] == p.id)
        for p in items) / len(items)
    run = load_run(tmp_path)
    data = run_json(run)
    assert data["metrics"]["avg_at_n"]["value"] == pytest.approx(expected_avg), "over the generations that ran"
    assert data["failed_generations"] == failed and data["generations"] == 18
    assert f"{failed}/18 generations failed" in data["incomplete"]
    broken["on"] = False
    issued = len(backend.requests)
    evaluate(spec, backend, items, tmp_path)
    assert len(backend.requests) > issued, "a resume retries problems whose generations failed"
    data = run_json(load_run(tmp_path))
    assert data["failed_generations"] == 0 and data["generations"] == 18


# -- 3. a budget-stopped problem is scored by rule -------------------------------------------------
class Jittered(ScriptedBackend):
    """Replies whose arrival order changes from run to run (as a real server's would)."""

    def __init__(self, responder, order_seed: int) -> None:
        super().__init__(responder)
        self.rng = random.Random(order_seed)

    async def generate(self, request: GenerationRequest) -> Generation:
        await asyncio.sleep(self.rng.random() * 0.02)
        return await super().generate(request)


def budget_reply(items: list[Problem]):
    def respond(request: GenerationRequest, number: int) -> str:
        seed = request.sampling.seed or 0
        gold = gold_of(prompt_text(request), items)
        answer = gold if seed % 5 in (0, 1, 2) else str(seed % 7)
        return "x" * (10 + seed % 40) + f" \\boxed{{{answer}}}"

    return respond


def test_a_token_budget_stop_is_scored_the_same_whatever_order_replies_arrive_in(tmp_path):
    items = problems(4)
    config = RSAConfig(population=4, k=2, rounds=2, budget=80, tail=10, seed=7, token_budget=330)
    outcomes = []
    for order in range(4):
        out = tmp_path / f"run{order}"
        evaluate(EvalSpec("aime25", config), Jittered(budget_reply(items), order), items, out)
        records = sorted(read_problems(out / "problems.jsonl"), key=lambda r: r.problem_id)
        outcomes.append([(r.problem_id, r.scored_round, r.correct, r.population, r.answer) for r in records])
        data = run_json(load_run(out))
        # The returned answer is the scored population's majority, so final and maj@N agree.
        assert data["metrics"]["final"]["value"] == data["metrics"]["majority"]["value"]
        assert data["stopped"] == 4
        for row in data["rounds"]:  # every round row covers every problem, carrying stopped ones forward
            assert row["avg_at_n"] is not None
        scored = {r.scored_round for r in records}
        last = data["rounds"][-1]
        if max(scored) < last["round"]:
            assert last["avg_at_n"] == pytest.approx(data["metrics"]["avg_at_n"]["value"])
    assert all(o == outcomes[0] for o in outcomes), "the same seed scores the same, whatever the timing"


def test_stopped_before_any_round_fit_scores_wrong_and_says_so(tmp_path):
    items = problems(2)
    config = RSAConfig(population=4, k=2, rounds=1, budget=80, tail=10, seed=7, token_budget=30)
    evaluate(EvalSpec("aime25", config), ScriptedBackend(budget_reply(items)), items, tmp_path)
    data = run_json(load_run(tmp_path))
    assert data["unscored"] == 2 and data["metrics"]["final"]["value"] == 0.0
    assert "2 stopped before a round fit the limit (scored wrong)" in data["incomplete"]


# -- 5. no zero-width intervals -------------------------------------------------------------------
def test_no_accuracy_has_a_zero_width_interval():
    low, high = interval_units([[(1, 1), (1, 1), (0, 1)]] * 3)  # 6/9: each problem 2 of 3 repeats
    assert low < 2 / 3 < high
    low, high = interval_units([[(2, 3)]] * 3)  # each population 2 of 3
    assert low < 2 / 3 < high
    assert interval_units([]) is None
    assert interval_units([[(1, 1)]] * 5) == clopper_pearson(5, 5), "every problem 0 or 1: exact binomial"
    assert clopper_pearson(5, 5)[0] == pytest.approx(0.025 ** (1 / 5))


def test_maj_at_n_over_repeats_has_an_honest_interval(tmp_path):
    from tests.test_evals import _run_data

    def record(pid, repeat, majority):
        from markov_rsa.evals.log import ProblemRecord

        score = {"round": 0, "kind": "initial", "n": 3, "correct": 2 if majority else 1, "majority": majority,
                 "completion_tokens": 10}
        return ProblemRecord(attempt=f"{pid}{repeat}", problem_id=pid, repeat=repeat, task="lcb", rounds=[score],
                             population=score, correct=majority, scored_round=0)

    records = [record(f"p{i}", r, r != 2) for i in range(3) for r in range(3)]
    data = run_json(_run_data(records, [f"p{i}" for i in range(3)], 3))
    for metric in data["metrics"].values():
        assert metric["low"] < metric["high"], metric
    for row in data["rounds"]:
        assert row["avg_at_n_low"] < row["avg_at_n_high"]


# -- summaries over a plan ---------------------------------------------------------------------------
def test_unfinished_planned_problems_are_counted():
    from markov_rsa.evals.log import ProblemRecord

    score = {"round": 0, "kind": "initial", "n": 2, "correct": 2, "majority": True, "completion_tokens": 10}
    done = ProblemRecord(attempt="a", problem_id="p1", repeat=0, task="aime25", rounds=[score], population=score,
                         correct=True, scored_round=0)
    summary = summarise([done], ["p1", "p2", "p3", "p4"], 1)
    assert (summary.planned, summary.finished, summary.missing) == (4, 1, 3)
    assert summary.final == 0.25 and summary.avg_at_n == 0.25


def test_round_rows_list_how_many_reached_each_round(tmp_path):
    items = problems(4)
    config = RSAConfig(population=4, k=2, rounds=2, budget=80, tail=10, seed=7, token_budget=330)
    evaluate(EvalSpec("aime25", config), ScriptedBackend(budget_reply(items)), items, tmp_path)
    rows = rounds_table([load_run(tmp_path)])
    assert rows[0][-1] == "reached" and all(row[-1].endswith("/4") for row in rows[1:])
