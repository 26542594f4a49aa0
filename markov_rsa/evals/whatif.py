"""What consensus early exit would have given, computed from a logged run without calling a model.

Every round of every problem is logged with its agreement (as :mod:`markov_rsa.rsa.consensus`
measures it), whether its vote was correct and the tokens it generated. Rounds depend only on the
seed and the rounds before them, so a run with early exit at threshold x on the same seeds would have
produced exactly the logged rounds up to the first one that agrees enough, then stopped and let that
round vote. Replaying that rule over the log gives accuracy (with intervals) and tokens per threshold,
which is how a threshold is chosen for a model on its data.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from markov_rsa.errors import ConfigError
from markov_rsa.evals.intervals import interval
from markov_rsa.evals.log import CANDIDATES_FILE, ProblemRecord, read_candidates
from markov_rsa.evals.metrics import mean
from markov_rsa.rsa.consensus import answer_agreement

#: Stop reasons after which a problem's later rounds were never run.
_STOPPED_EARLY = ("consensus", "total_token_budget")


@dataclass(frozen=True)
class Replayed:
    """One problem and repeat under a threshold: the answer's correctness, tokens, and the round that
    would have stopped the run (None: it runs to the end, as logged)."""

    correct: bool
    tokens: int
    exit_round: int | None


def replay(record: ProblemRecord, threshold: float, min_rounds: int = 0) -> Replayed:
    """Early exit's rule over one logged problem (see the module's docstring)."""
    total = 0
    cut = record.stop_reason in _STOPPED_EARLY  # its last logged round was not its last stage
    for position, score in enumerate(record.rounds):
        total += int(score["completion_tokens"])
        if score.get("kind") == "final" or (position == len(record.rounds) - 1 and not cut):
            break  # the last stage votes whatever its agreement
        agreement = score.get("agreement")
        if agreement is None:
            raise ConfigError("early_exit", f"problem {record.problem_id}: round {score['round']} has no logged "
                                            "agreement; re-run the evaluation with this version")
        if score["round"] >= min_rounds and agreement >= threshold:
            return Replayed(bool(score["majority"]), total, int(score["round"]))
    if cut:
        raise ConfigError("early_exit", f"problem {record.problem_id} stopped early ({record.stop_reason}), so "
                                        f"its later rounds were never run; a what-if at {threshold} needs a run "
                                        "with every round")
    return Replayed(record.correct, record.completion_tokens, None)


@dataclass(frozen=True)
class WhatIf:
    """One benchmark under one threshold (``None``: the run as logged)."""

    task: str
    threshold: float | None
    problems: int
    accuracy: float
    low: float
    high: float
    tokens_per_problem: float
    #: Problem repeats the threshold would have stopped early.
    stopped_early: int
    runs: int

    def to_dict(self) -> dict[str, Any]:
        return {"task": self.task, "threshold": self.threshold, "problems": self.problems,
                "accuracy": {"value": self.accuracy, "low": self.low, "high": self.high},
                "tokens_per_problem": self.tokens_per_problem, "stopped_early": self.stopped_early,
                "runs": self.runs}


def _point(task: str, threshold: float | None, records: Sequence[ProblemRecord],
           outcomes: Sequence[Replayed]) -> WhatIf:
    per_problem: dict[str, list[float]] = {}
    for record, outcome in zip(records, outcomes, strict=True):
        per_problem.setdefault(record.problem_id, []).append(float(outcome.correct))
    values = [mean(v) for v in per_problem.values()]
    low, high = interval(values) if values else (0.0, 0.0)
    return WhatIf(task, threshold, len(per_problem), mean(values), low, high,
                  mean(o.tokens for o in outcomes), sum(o.exit_round is not None for o in outcomes), len(outcomes))


def what_if(records: Sequence[ProblemRecord], thresholds: Sequence[float], min_rounds: int = 0) -> list[WhatIf]:
    """Per benchmark: the run as logged, then each threshold."""
    for threshold in thresholds:
        if not 0 < threshold <= 1:
            raise ConfigError("early_exit", f"thresholds are shares of the population in (0, 1], got {threshold}")
    by_task: dict[str, list[ProblemRecord]] = {}
    for record in records:
        by_task.setdefault(record.task, []).append(record)
    points = []
    for task, group in sorted(by_task.items()):
        logged = [Replayed(r.correct, r.completion_tokens, None) for r in group]
        points.append(_point(task, None, group, logged))
        for threshold in thresholds:
            points.append(_point(task, threshold, group, [replay(r, threshold, min_rounds) for r in group]))
    return points


def fill_agreement(records: Sequence[ProblemRecord], run_dir: Path) -> list[ProblemRecord]:
    """Records of runs logged before agreement was, with it computed from their candidates' answers
    (math and free-form answers; programs need their public tests run, so code runs must be re-run)."""
    if all(s.get("agreement") is not None or s.get("kind") == "final" for r in records for s in r.rounds):
        return list(records)
    answers: dict[tuple[str, int], list[tuple[int, str | None]]] = {}
    for c in read_candidates(run_dir / CANDIDATES_FILE, {r.attempt for r in records}):
        answers.setdefault((c.attempt, c.round), []).append((c.index, c.answer if c.error is None else None))
    filled = []
    for record in records:
        if record.task.startswith("lcb"):
            filled.append(record)  # replay() names what is missing
            continue
        rounds: list[Mapping[str, Any]] = []
        for score in record.rounds:
            if score.get("agreement") is None and score.get("kind") != "final":
                population = [a for _, a in sorted(answers.get((record.attempt, score["round"]), []))]
                score = {**score, "agreement": answer_agreement(population)}
            rounds.append(score)
        filled.append(ProblemRecord(**{**record.to_dict(), "rounds": rounds}))
    return filled
