"""``make bench`` section *adaptive*: tokens saved by consensus early exit and by one total token budget.

A scripted loopback server draws each candidate's answer from a per-problem, per-round distribution
that is fixed in advance (some problems agree at round 0, some converge over the rounds, some never
agree); replies carry their round so the server knows which distribution applies. The same 40 problems
and seed run in full, with early exit at 0.8 / 0.9 / 1.0, and with a total token budget of half the
full run's tokens; the what-if replayed from the full run's log is shown beside the real re-runs. The
workload is scripted: real savings depend on how often a model's population agrees.
"""

from __future__ import annotations

import asyncio
import random
import re
import tempfile
from pathlib import Path
from typing import Any

from markov_rsa import RSAConfig
from markov_rsa.backends.openai import OpenAIBackend
from markov_rsa.evals.datasets import Problem
from markov_rsa.evals.grading.math import MathGrader
from markov_rsa.evals.intervals import interval
from markov_rsa.evals.log import PROBLEMS_FILE, ProblemRecord, read_problems
from markov_rsa.evals.metrics import mean
from markov_rsa.evals.runner import EvalSpec, Evaluation
from markov_rsa.evals.whatif import what_if
from tests.servers import FaultServer, serve_app

CONFIG = RSAConfig(population=10, k=4, rounds=2, budget=400, tail=256, seed=1)
THRESHOLDS = (0.8, 0.9, 1.0)
#: Kinds of problem: how many, and per round the share of the gold answer and of wrong answers 1, 2, ...
KINDS: dict[str, tuple[int, list[list[float]]]] = {
    "agree at round 0": (16, [[1.0]]),
    "converge by round 1": (10, [[0.6, 0.25, 0.15], [0.97, 0.03], [1.0]]),
    "converge slowly": (6, [[0.4, 0.5, 0.1], [0.6, 0.4], [0.8, 0.2]]),
    "never agree": (8, [[0.3, *[0.1] * 7]]),
}
_MARK = re.compile(r"<r(\d+)>")
_ID = re.compile(r"\[(a\d+)\]")


def _workload() -> tuple[list[Problem], dict[str, list[list[float]]]]:
    problems, shares = [], {}
    for kind, (count, rounds) in KINDS.items():
        for _ in range(count):
            pid = f"a{len(problems):02d}"
            problems.append(Problem(id=pid, task="aime25", answer=str(100 + len(problems)),
                                    problem=f"[{pid}] A scripted problem ({kind}). Give the answer in \\boxed{{}}."))
            shares[pid] = rounds
    return problems, shares


def _server(problems: list[Problem], shares: dict[str, list[list[float]]]) -> FaultServer:
    gold = {p.id: int(p.answer or 0) for p in problems}

    def reply(body: dict[str, Any]) -> str:
        prompt = str(body["messages"][-1]["content"])
        match = _ID.search(prompt)
        pid = match.group(1) if match else "a00"
        marks = [int(m) for m in _MARK.findall(prompt)]
        t = max(marks) + 1 if marks else 0
        seed = int(body.get("seed", 0))
        rounds = shares[pid]
        weights = rounds[min(t, len(rounds) - 1)]
        pick = random.Random(seed).choices(range(len(weights)), weights)[0]
        answer = gold[pid] + 500 * pick  # pick 0 is the gold answer
        return "Reasoning step by step. " * (3 + seed % 4) + f"\\boxed{{{answer}}} <r{t}>"

    return FaultServer(reply=reply)


async def _evaluate(url: str, problems: list[Problem], out: Path, config: RSAConfig, grader: MathGrader,
                    total: int | None = None) -> list[ProblemRecord]:
    backend = OpenAIBackend(f"{url}/v1", model="scripted", max_concurrency=256)
    spec = EvalSpec(task="aime25", config=config, concurrency=8, total_token_budget=total)
    try:
        await Evaluation(spec, backend, problems, out, math_grader=grader).run()
    finally:
        await backend.aclose()
    return read_problems(out / PROBLEMS_FILE)


def _score(records: list[ProblemRecord]) -> dict[str, Any]:
    values = [float(r.correct) for r in records]
    low, high = interval(values)
    return {"accuracy": mean(values), "low": low, "high": high,
            "tokens": mean(r.completion_tokens for r in records),
            "stopped": sum(r.stop_reason != "complete" for r in records)}


def bench_adaptive() -> dict[str, Any]:
    problems, shares = _workload()
    server = _server(problems, shares)
    rows: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp, serve_app(server.app()) as url, MathGrader() as grader:

        async def all_runs() -> list[dict[str, Any]]:
            full = await _evaluate(url, problems, Path(tmp) / "full", CONFIG, grader)
            rows["full run"] = _score(full)
            predicted = {p.threshold: p for p in what_if(full, THRESHOLDS)}
            for threshold in THRESHOLDS:
                records = await _evaluate(url, problems, Path(tmp) / f"exit-{threshold}",
                                          CONFIG.replace(early_exit=threshold), grader)
                point = predicted[threshold]
                rows[f"early exit {threshold:g}"] = {**_score(records), "what_if_accuracy": point.accuracy,
                                                     "what_if_tokens": point.tokens_per_problem}
            budget = int(sum(r.completion_tokens for r in full) * 0.5)
            records = await _evaluate(url, problems, Path(tmp) / "budget", CONFIG, grader, total=budget)
            spent = sum(r.completion_tokens for r in records)
            rows["total token budget 50%"] = {**_score(records), "budget": budget, "spent": spent}
            return [p.to_dict() for p in predicted.values()]

        points = asyncio.run(all_runs())
    full = rows["full run"]
    table = []
    for name, row in rows.items():
        saved = 1 - row["tokens"] / full["tokens"]
        replayed = ""
        if "what_if_tokens" in row:
            same = (row["what_if_tokens"] == row["tokens"] and row["what_if_accuracy"] == row["accuracy"])
            replayed = "equal" if same else (f"{100 * row['what_if_accuracy']:.1f}, "
                                             f"{row['what_if_tokens']:,.0f} tokens")
        elif "budget" in row:
            replayed = f"spent {row['spent']:,} of {row['budget']:,}"
        table.append([name, f"{100 * row['accuracy']:.1f} [{100 * row['low']:.1f}, {100 * row['high']:.1f}]",
                      f"{row['tokens']:,.0f}", f"{100 * saved:.0f}%", f"{row['stopped']}/{len(problems)}", replayed])
    return {"rows": table, "runs": rows, "what_if": points, "problems": len(problems),
            "kinds": {kind: count for kind, (count, _) in KINDS.items()}}


def markdown(results: dict[str, Any]) -> list[str]:
    from bench.tables import md_table

    kinds = ", ".join(f"{count} {kind}" for kind, count in results["kinds"].items())
    runs = results["runs"]
    exit9, budget, full = runs["early exit 0.9"], runs["total token budget 50%"], runs["full run"]
    return [
        "## 9. Adaptive compute: consensus early exit and a total token budget",
        f"**Scripted workload: real savings depend on the model.** {results['problems']} problems ({kinds}) "
        "against a loopback server that draws each candidate's answer from a per-problem, per-round "
        "distribution fixed in advance; Markovian RSA N=10 K=4 T=2, seed 1, graded by the math grader. "
        "*final*: the returned answer's accuracy [95% interval]; *stopped*: problems that ended before their "
        "last stage; *what-if*: `rsa report --early-exit` replayed from the full run's log, against the real "
        "re-run. Targets: early exit at 0.9 ≥ 30% fewer tokens at unchanged accuracy; the total budget at 50% "
        "of the full cost within one point of the full run.",
        md_table(["method", "final", "tokens/problem", "tokens saved", "stopped", "what-if / spend"],
                 results["rows"]),
        f"Reading: early exit at 0.9 saves {100 * (1 - exit9['tokens'] / full['tokens']):.0f}% of the tokens at "
        f"{100 * exit9['accuracy']:.1f}% against {100 * full['accuracy']:.1f}%; the scheduler at half the "
        f"tokens reaches {100 * budget['accuracy']:.1f}% by giving later rounds to the populations that "
        "disagreed (a unanimous round 0 is not re-run).",
    ]
