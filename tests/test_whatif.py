"""The what-if of consensus early exit, replayed from a logged run, equals a real re-run with early exit
on the same seeds and scripted backend; ``rsa report --early-exit`` shows it."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from markov_rsa import RSAConfig
from markov_rsa.errors import ConfigError
from markov_rsa.evals.datasets import Problem
from markov_rsa.evals.log import PROBLEMS_FILE, read_problems
from markov_rsa.evals.metrics import summarise
from markov_rsa.evals.runner import EvalSpec, Evaluation
from markov_rsa.evals.whatif import replay, what_if
from markov_rsa.rsa.answers import normalize_answer
from tests.doubles import ScriptedBackend

#: Per problem: gold answer and each round's answers (the last list repeats for later rounds).
SCRIPT: dict[str, tuple[str, dict[int, list[str]]]] = {
    "p0": ("7", {0: ["7"] * 5}),
    "p1": ("7", {0: ["7", "7", "7", "7", "1"], 1: ["7"] * 5}),
    "p2": ("2", {0: ["1", "1", "1", "2", "3"], 1: ["1", "1", "2", "2", "2"], 2: ["2"] * 5}),
    "p3": ("3", {0: ["1", "2", "3", "4", "5"]}),
    "p4": ("6", {0: ["5", "5", "5", "6", "6"], 1: ["6", "6", "6", "6", "5"], 2: ["6"] * 5}),
}
PROBLEMS = [Problem(id=pid, task="aime25", problem=f"[{pid}] Find the number.", answer=gold)
            for pid, (gold, _) in SCRIPT.items()]
CONFIG = RSAConfig(population=5, k=2, rounds=3, budget=400, tail=30, seed=11)


def reply(request, _number):
    pid = re.search(r"\[(p\d)\]", request.messages[-1]["content"]).group(1)
    t, i = request.tags["round"], request.tags["index"]
    rounds = SCRIPT[pid][1]
    answers = rounds.get(t, rounds[max(rounds)])
    return "w" * (10 + 3 * t + i + len(pid)) + f" \\boxed{{{answers[i]}}}"


class ExactGrader:
    async def grade_problem(self, answer, problem):
        return answer is not None and normalize_answer(answer) == normalize_answer(problem.answer)

    def close(self):
        return None


async def evaluate(out: Path, config: RSAConfig) -> list:
    spec = EvalSpec(task="aime25", config=config, concurrency=2)
    await Evaluation(spec, ScriptedBackend(reply), PROBLEMS, out, math_grader=ExactGrader()).run()
    return read_problems(out / PROBLEMS_FILE)


@pytest.mark.parametrize("min_rounds", [0, 1])
async def test_what_if_equals_a_real_rerun_with_early_exit(tmp_path, min_rounds):
    full = await evaluate(tmp_path / "full", CONFIG)
    thresholds = [0.6, 0.8, 1.0]
    predicted = {p.threshold: p for p in what_if(full, thresholds, min_rounds)}
    assert predicted[None].tokens_per_problem == summarise(full).tokens_per_problem
    for threshold in thresholds:
        rerun = await evaluate(tmp_path / f"exit-{threshold}", CONFIG.replace(early_exit=threshold,
                                                                              min_rounds=min_rounds))
        by_id = {r.problem_id: r for r in rerun}
        for record in full:
            replayed, real = replay(record, threshold, min_rounds), by_id[record.problem_id]
            assert (replayed.correct, replayed.tokens) == (real.correct, real.completion_tokens), record.problem_id
            assert (replayed.exit_round is not None) == (real.stop_reason == "consensus")
            if replayed.exit_round is not None:
                assert replayed.exit_round == real.rounds[-1]["round"] >= min_rounds
        point, summary = predicted[threshold], summarise(rerun)
        assert point.accuracy == summary.final and point.tokens_per_problem == summary.tokens_per_problem
    # The script makes the thresholds differ: lower ones stop more problems and spend less.
    assert predicted[0.6].tokens_per_problem < predicted[0.8].tokens_per_problem < predicted[1.0].tokens_per_problem
    assert predicted[1.0].tokens_per_problem < predicted[None].tokens_per_problem


async def test_what_if_refuses_what_a_run_never_ran(tmp_path):
    stopped = await evaluate(tmp_path / "stopped", CONFIG.replace(early_exit=0.6))
    assert what_if(stopped, [0.6])[1].stopped_early == 4  # what it did run replays (p3 never agrees)
    with pytest.raises(ConfigError, match="never run"):
        what_if(stopped, [1.0])


async def test_rsa_report_early_exit_table_and_json(tmp_path):
    await evaluate(tmp_path / "full", CONFIG)
    out = tmp_path / "report"
    done = subprocess.run([sys.executable, "-m", "markov_rsa", "report", str(tmp_path / "full"), "--out", str(out),
                           "--early-exit", "0.8", "0.9", "1.0"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    md = (out / "report.md").read_text()
    assert "What if: consensus early exit" in md and "| full | aime25 | 0.9 |" in md
    points = json.loads((out / "report.json").read_text())["what_if"]["runs"]["full"]
    assert [p["threshold"] for p in points] == [None, 0.8, 0.9, 1.0]
    bad = subprocess.run([sys.executable, "-m", "markov_rsa", "report", str(tmp_path / "full"), "--out", str(out),
                          "--early-exit", "1.5"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "early_exit" in bad.stderr and "(0, 1]" in bad.stderr
