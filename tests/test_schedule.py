"""One token budget across a benchmark: the scheduler's priority, budget, determinism and resumption."""

from __future__ import annotations

import json
import re
from pathlib import Path

from markov_rsa import RSAConfig
from markov_rsa.evals.log import PROBLEMS_FILE, read_problems
from markov_rsa.evals.runner import SCHEDULE_FILE, EvalSpec, Evaluation
from tests.doubles import ScriptedBackend
from tests.test_whatif import PROBLEMS, SCRIPT, ExactGrader

CONFIG = RSAConfig(population=5, k=2, rounds=2, budget=400, tail=30, seed=5)
#: Every reply of problem pN is the same length in every round (so a round's cost is known in advance).
LENGTH = 20


def reply(request, _number):
    pid = re.search(r"\[(p\d)\]", request.messages[-1]["content"]).group(1)
    t, i = request.tags["round"], request.tags["index"]
    rounds = SCRIPT[pid][1]
    answer = rounds.get(t, rounds[max(rounds)])[i]
    return "w" * (LENGTH - len(answer) - 9) + f" \\boxed{{{answer}}}"


ROUND = 5 * LENGTH  # tokens of one round of one problem


async def evaluate(out: Path, budget: int | None, *, limit: int | None = None, concurrency: int = 2,
                   force: bool = False) -> dict:
    spec = EvalSpec(task="aime25", config=CONFIG, concurrency=concurrency, total_token_budget=budget, limit=limit,
                    force=force)
    evaluation = Evaluation(spec, ScriptedBackend(reply), PROBLEMS, out, math_grader=ExactGrader())
    await evaluation.run()
    records = {r.problem_id: r for r in read_problems(out / PROBLEMS_FILE)}
    schedule = json.loads((out / SCHEDULE_FILE).read_text()) if budget is not None else {}
    return {"records": records, "schedule": schedule}


async def test_rounds_go_to_the_least_agreeing_problems_within_the_budget(tmp_path):
    full = await evaluate(tmp_path / "full", None)
    assert sum(r.completion_tokens for r in full["records"].values()) == 5 * 3 * ROUND
    # Round 0 of all five problems, then room for three more rounds.
    run = await evaluate(tmp_path / "budget", 5 * ROUND + 3 * ROUND)
    spent = {pid: r.completion_tokens // ROUND for pid, r in run["records"].items()}
    # Round-0 agreement: p3 0.2, p2 0.6, p4 0.6, p1 0.8, p0 1.0. Wave 1 grants p3, p2, p4 (p2 before p4:
    # problem order breaks the tie); wave 2 has nothing left to give.
    assert spent == {"p0": 1, "p1": 1, "p2": 2, "p3": 2, "p4": 2}
    assert run["schedule"]["spent"] == 8 * ROUND <= run["schedule"]["total_token_budget"]
    stopped = {pid for pid, r in run["records"].items() if r.stop_reason == "total_token_budget"}
    assert stopped == set(SCRIPT)
    assert run["schedule"]["problems"]["p3#0"] == {"stages": 2, "tokens": 2 * ROUND, "stopped_by_budget": True}
    # The refused problems' last round voted: p0 and p1 were already right at round 0.
    assert run["records"]["p0"].correct and run["records"]["p1"].correct


async def test_enough_budget_runs_everything_as_without_one(tmp_path):
    full = await evaluate(tmp_path / "full", None)
    run = await evaluate(tmp_path / "budget", 5 * 3 * ROUND)
    assert {p: (r.correct, r.completion_tokens, r.stop_reason) for p, r in run["records"].items()} == {
        p: (r.correct, r.completion_tokens, r.stop_reason) for p, r in full["records"].items()}
    assert run["schedule"]["spent"] == 15 * ROUND


async def test_same_seed_same_schedule_whatever_the_concurrency(tmp_path):
    one = await evaluate(tmp_path / "a", 11 * ROUND, concurrency=1)
    two = await evaluate(tmp_path / "b", 11 * ROUND, concurrency=5)
    assert one["schedule"] == two["schedule"]
    assert {p: (r.correct, r.completion_tokens, r.stop_reason) for p, r in one["records"].items()} == {
        p: (r.correct, r.completion_tokens, r.stop_reason) for p, r in two["records"].items()}


async def test_a_resumed_run_counts_what_finished_problems_spent(tmp_path):
    first = await evaluate(tmp_path / "run", 9 * ROUND, limit=2)  # p0 and p1, all three rounds each
    assert first["schedule"]["spent"] == 6 * ROUND
    resumed = await evaluate(tmp_path / "run", 9 * ROUND, force=True)  # a larger plan: resumed on purpose
    assert resumed["schedule"]["spent_before"] == 6 * ROUND
    assert resumed["schedule"]["spent"] == 9 * ROUND  # three round 0s, nothing left for more
    assert set(resumed["schedule"]["problems"]) == {"p2#0", "p3#0", "p4#0"}
    assert all(resumed["records"][p].completion_tokens == ROUND for p in ("p2", "p3", "p4"))


def test_a_budget_below_one_token_is_refused(tmp_path):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "markov_rsa", "eval", "aime25", "--out", str(tmp_path / "r"),
                           "--total-token-budget", "0", "--backend", "demo"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and "total_token_budget: must be a positive number of tokens" in done.stderr
    done = subprocess.run([sys.executable, "-m", "markov_rsa", "eval", "aime25", "--out", str(tmp_path / "r"),
                           "--total-token-budget", "1000", "--rounds", "0", "--backend", "demo"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "total_token_budget: a run of one stage" in done.stderr
