"""Per-problem scores and the small pure reducers that turn them into a results table.

avg@N (the mean accuracy of a population, the ZAYA1 report's headline metric), majority-vote
correctness and pass@N are computed for every round, so reports show accuracy round by round.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from markov_rsa.evals.log import ProblemRecord


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (Chen et al., 2021)."""
    if n <= 0 or k <= 0:
        return 0.0
    k = min(k, n)
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


@dataclass(frozen=True)
class RoundScore:
    round: int
    kind: str
    n: int
    correct: int
    majority: bool
    completion_tokens: int

    @property
    def avg(self) -> float:
        return self.correct / self.n if self.n else 0.0

    @property
    def pass_at_n(self) -> float:
        return pass_at_k(self.n, self.correct, self.n)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "avg": self.avg, "pass_at_n": self.pass_at_n}


def round_score(round_index: int, kind: str, correct: Sequence[bool], majority_index: int | None,
                completion_tokens: int) -> RoundScore:
    majority = majority_index is not None and bool(correct[majority_index])
    return RoundScore(round_index, kind, len(correct), sum(map(bool, correct)), majority, completion_tokens)


def mean(values: Iterable[float]) -> float:
    items = list(values)
    return sum(items) / len(items) if items else 0.0


@dataclass(frozen=True)
class Summary:
    """One run's results over its problems (repeats averaged in)."""

    problems: int
    avg_at_n: float
    majority: float
    pass_at_n: float
    final: float
    tokens_per_problem: float
    seconds_per_problem: float
    #: Per stage: (round, kind, mean avg@N, mean majority, mean pass@N, mean cumulative tokens).
    rounds: list[tuple[int, str, float, float, float, float]]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def summarise(records: Sequence[ProblemRecord]) -> Summary:
    """Reduce problem records (one per problem and repeat) to a Summary."""
    if not records:
        return Summary(0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, [])
    stages: dict[int, list[Mapping[str, Any]]] = {}
    cumulative: dict[int, list[float]] = {}
    for record in records:
        total = 0
        for score in record.rounds:
            total += score["completion_tokens"]
            stages.setdefault(score["round"], []).append(score)
            cumulative.setdefault(score["round"], []).append(total)
    rounds = [
        (r, scores[0]["kind"], mean(s["avg"] for s in scores), mean(float(s["majority"]) for s in scores),
         mean(s["pass_at_n"] for s in scores), mean(cumulative[r]))
        for r, scores in sorted(stages.items())
    ]
    last = [record.population for record in records]
    return Summary(
        problems=len({record.problem_id for record in records}),
        avg_at_n=mean(p["avg"] for p in last),
        majority=mean(float(p["majority"]) for p in last),
        pass_at_n=mean(p["pass_at_n"] for p in last),
        final=mean(float(record.correct) for record in records),
        tokens_per_problem=mean(record.completion_tokens for record in records),
        seconds_per_problem=mean(record.seconds for record in records),
        rounds=rounds,
    )


def per_problem(records: Sequence[ProblemRecord], metric: str) -> dict[str, float]:
    """One value per problem (repeats averaged): ``avg``, ``majority`` or ``pass_at_n`` of the population,
    or ``final`` (the returned answer), the unit a problem-level interval resamples."""
    values: dict[str, list[float]] = {}
    for record in records:
        value = float(record.correct) if metric == "final" else float(record.population.get(metric, 0.0))
        values.setdefault(record.problem_id, []).append(value)
    return {problem: mean(v) for problem, v in values.items()}


def per_problem_round(records: Sequence[ProblemRecord], round_index: int) -> list[float]:
    """avg@N of one round, one value per problem (repeats averaged)."""
    values: dict[str, list[float]] = {}
    for record in records:
        for score in record.rounds:
            if score["round"] == round_index:
                values.setdefault(record.problem_id, []).append(float(score["avg"]))
    return [mean(v) for v in values.values()]
