"""Per-problem scores and the small pure reducers that turn them into a results table.

avg@N (the mean accuracy of a population, the ZAYA1 report's headline metric), majority-vote
correctness and pass@N are computed for every round, so reports show accuracy round by round.

Every figure is over the *planned* problems: a problem (or repeat) that failed or never finished
scores wrong and is counted beside the number, so a failure never shrinks the denominator.
Repeats are averaged within a problem first, then problems are averaged, for the headline and for
every round alike. A generation that failed after retries is neither right nor wrong: avg@N is
over the generations that ran, and the failed ones are counted. A problem stopped by a token or
time limit is scored on the stage that voted (see :func:`scored_stage`), and every later round's
row carries that stage forward, so rows and headline agree.

To add a metric: give :class:`RoundScore` the field, and name it in :data:`METRICS` with the
function that reads one repeat's unit from a stage (:func:`units`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from markov_rsa.evals.log import ProblemRecord

#: One repeat's share of a metric: (successes, trials). avg@N has a trial per generation that ran;
#: the others one per repeat.
Unit = tuple[int, int]


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
    #: Candidates the stage holds (``failed`` of them failed after retries).
    n: int
    correct: int
    majority: bool
    completion_tokens: int
    failed: int = 0
    #: False when a token or time limit cut the stage short.
    complete: bool = True
    #: Every token the stage generated, cancelled and failed streams included.
    generated_tokens: int = 0
    prompt_tokens: int = 0

    @property
    def ran(self) -> int:
        return self.n - self.failed

    @property
    def avg(self) -> float:
        return self.correct / self.ran if self.ran else 0.0

    @property
    def pass_at_n(self) -> float:
        return pass_at_k(self.ran, self.correct, self.ran)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "avg": self.avg, "pass_at_n": self.pass_at_n}


def round_score(round_index: int, kind: str, correct: Sequence[bool], majority_index: int | None,
                completion_tokens: int, *, failed: int = 0, complete: bool = True, generated_tokens: int | None = None,
                prompt_tokens: int = 0) -> RoundScore:
    majority = majority_index is not None and bool(correct[majority_index])
    return RoundScore(round_index, kind, len(correct), sum(map(bool, correct)), majority, completion_tokens, failed,
                      complete, completion_tokens if generated_tokens is None else generated_tokens, prompt_tokens)


def scored_stage(scores: Sequence[Mapping[str, Any]], stop_reason: str, token_budget: int | None) -> int | None:
    """Which stage a problem is scored on (its position in ``scores``), decided by rule, not by timing.

    With a ``token_budget``: the last complete stage after which the run had generated fewer tokens
    than the budget. The engine always goes on past such a stage, so the choice depends only on what
    the seed generated, never on which candidate happened to finish first in the stage that reached
    the budget (which decides whether the engine cut that stage short, or even called the run
    complete). Otherwise: the last complete generation stage (a time limit cuts where it cuts).
    ``None`` when no stage qualifies (the problem scores wrong, and is counted as such)."""
    stages = [i for i, s in enumerate(scores) if s.get("kind") != "final"]
    if stop_reason == "complete" and token_budget is None:
        return stages[-1] if stages else None
    chosen = None
    spent = 0
    for i in stages:
        s = scores[i]
        spent += int(s.get("generated_tokens", s.get("completion_tokens", 0)))
        if not s.get("complete", True):
            break
        if token_budget is not None and spent >= token_budget:
            break
        chosen = i
    return chosen


def mean(values: Iterable[float]) -> float:
    items = list(values)
    return sum(items) / len(items) if items else 0.0


MISSING: Unit = (0, 1)


def _avg_unit(score: Mapping[str, Any]) -> Unit:
    ran = int(score.get("n", 0)) - int(score.get("failed", 0))
    return (int(score.get("correct", 0)), ran) if ran > 0 else MISSING


#: The accuracies of a stage: name → the unit one repeat contributes.
STAGE_METRICS: dict[str, Callable[[Mapping[str, Any]], Unit]] = {
    "avg": _avg_unit,
    "majority": lambda s: (int(bool(s.get("majority"))), 1),
    "pass_at_n": lambda s: (int(s.get("correct", 0) > 0), 1),
}


@dataclass(frozen=True)
class Planned:
    """One planned (problem, repeat) and what became of it."""

    problem_id: str
    repeat: int
    record: ProblemRecord | None

    @property
    def status(self) -> str:
        """``finished``, ``failed`` (the attempt failed), ``unscored`` (stopped before any stage fit its
        limit) or ``missing`` (never finished: interrupted, or still to run)."""
        if self.record is None:
            return "missing"
        if self.record.error is not None:
            return "failed"
        if self.record.scored_round is None and not self.record.population:
            return "unscored"
        return "finished"

    def stage(self, round_index: int | None = None) -> Mapping[str, Any] | None:
        """The scores this repeat contributes to a round's row (``None``: the headline's stage): the
        stage itself, or the scored stage carried forward where the run stopped before it."""
        record = self.record
        if record is None or self.status != "finished":
            return None
        scored = _scored(record)
        if round_index is None or scored is None:
            return scored
        if scored.get("round", 0) <= round_index:
            return scored
        return next((s for s in record.rounds if s.get("round") == round_index and s.get("kind") != "final"), None)

    def unit(self, metric: str, round_index: int | None = None) -> Unit:
        if metric == "final":
            return (int(bool(self.record and self.status == "finished" and self.record.correct)), 1)
        stage = self.stage(round_index)
        return MISSING if stage is None else STAGE_METRICS[metric](stage)


def _scored(record: ProblemRecord) -> Mapping[str, Any] | None:
    if record.scored_round is not None:
        match = next((s for s in record.rounds if s.get("round") == record.scored_round), None)
        if match is not None:
            return match
    return record.population or None


def plan_of(records: Sequence[ProblemRecord], planned: Sequence[str] | None, repeats: int | None) -> list[Planned]:
    """Every planned (problem, repeat) with its record; without a recorded plan (older run directories),
    the problems and repeats that have records."""
    by_key = {(r.problem_id, r.repeat): r for r in records}
    if planned is None:
        return [Planned(r.problem_id, r.repeat, r) for r in records]
    count = repeats or 1
    return [Planned(pid, rep, by_key.get((pid, rep))) for pid in planned for rep in range(count)]


def by_problem(plan: Sequence[Planned]) -> dict[str, list[Planned]]:
    grouped: dict[str, list[Planned]] = {}
    for item in plan:
        grouped.setdefault(item.problem_id, []).append(item)
    return grouped


def units(plan: Sequence[Planned], metric: str, round_index: int | None = None) -> dict[str, list[Unit]]:
    """Per problem, one unit per planned repeat (what an interval resamples)."""
    return {pid: [item.unit(metric, round_index) for item in items] for pid, items in by_problem(plan).items()}


def problem_means(per_problem: Mapping[str, Sequence[Unit]]) -> dict[str, float]:
    """Each problem's value: the mean over its repeats of successes / trials."""
    return {pid: mean(c / t for c, t in us) for pid, us in per_problem.items()}


@dataclass(frozen=True)
class Summary:
    """One run's results over its planned problems (repeats averaged within each problem first)."""

    problems: int
    avg_at_n: float
    majority: float
    pass_at_n: float
    final: float
    tokens_per_problem: float
    seconds_per_problem: float
    #: Per stage: (round, kind, mean avg@N, mean majority, mean pass@N, mean cumulative tokens).
    rounds: list[tuple[int, str, float, float, float, float]]
    #: Problems planned; (problem, repeat)s finished, failed, stopped unscored and never finished.
    planned: int = 0
    finished: int = 0
    failed: int = 0
    unscored: int = 0
    missing: int = 0
    stopped: int = 0
    generations: int = 0
    failed_generations: int = 0
    repeats: tuple[int, int] = (0, 0)
    prompt_tokens_per_problem: float = 0.0
    #: Generated tokens over the whole run per correct returned answer (``None``: none correct).
    tokens_per_correct: float | None = None
    #: Per stage: how many finished repeats reached it (the others carry their scored stage forward).
    reached: dict[int, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def summarise(records: Sequence[ProblemRecord], planned: Sequence[str] | None = None,
              repeats: int | None = None) -> Summary:
    """Reduce problem records (one per problem and repeat) to a Summary over the planned problems."""
    plan = plan_of(records, planned, repeats)
    if not plan:
        return Summary(0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, [])
    finished = [item for item in plan if item.status == "finished"]
    metric = {name: mean(problem_means(units(plan, name)).values()) for name in (*STAGE_METRICS, "final")}
    kinds: dict[int, str] = {}
    for item in finished:
        assert item.record is not None
        for score in item.record.rounds:
            if score.get("kind") != "final":
                kinds.setdefault(int(score["round"]), str(score["kind"]))
    reached = {r: sum(1 for item in finished if item.record and any(
        s.get("round") == r and s.get("complete", True) for s in item.record.rounds)) for r in kinds}
    rounds = []
    for r in sorted(kinds):
        values = [mean(problem_means(units(plan, name, r)).values()) for name in STAGE_METRICS]
        rounds.append((r, kinds[r], values[0], values[1], values[2], _cumulative_tokens(finished, r)))
    done = [item.record for item in plan if item.record is not None and item.record.error is None]
    per_repeat = [len(items) for items in by_problem(plan).values()]
    generated = sum(_generated(r) for r in done)
    correct = sum(1 for item in finished if item.record and item.record.correct)
    return Summary(
        problems=len(by_problem(plan)),
        avg_at_n=metric["avg"],
        majority=metric["majority"],
        pass_at_n=metric["pass_at_n"],
        final=metric["final"],
        tokens_per_problem=mean(_generated(r) for r in done),
        seconds_per_problem=mean(r.seconds for r in done),
        rounds=rounds,
        planned=len(by_problem(plan)),
        finished=len(finished),
        failed=sum(1 for item in plan if item.status == "failed"),
        unscored=sum(1 for item in plan if item.status == "unscored"),
        missing=sum(1 for item in plan if item.status == "missing"),
        stopped=sum(1 for r in done if limited(r)),
        generations=sum(int(s.get("n", 0)) for r in done for s in r.rounds),
        failed_generations=sum(int(s.get("failed", 0)) for r in done for s in r.rounds),
        repeats=(min(per_repeat), max(per_repeat)),
        prompt_tokens_per_problem=mean(r.prompt_tokens for r in done),
        tokens_per_correct=generated / correct if correct else None,
        reached=reached,
    )


def limited(record: ProblemRecord) -> bool:
    """A token or time limit decided what was scored (stopped the run, or ruled out its last stage)."""
    if record.stop_reason != "complete":
        return True
    stages = [int(s["round"]) for s in record.rounds if s.get("kind") != "final"]
    return record.scored_round is not None and bool(stages) and record.scored_round != max(stages)


def _generated(record: ProblemRecord) -> int:
    return record.generated_tokens or record.completion_tokens


def _cumulative_tokens(finished: Sequence[Planned], round_index: int) -> float:
    """Mean generated tokens per finished repeat up to a round (a run stopped earlier: all it spent)."""
    totals = []
    for item in finished:
        assert item.record is not None
        spent = 0
        for score in item.record.rounds:
            if score.get("kind") == "final" or int(score["round"]) > round_index:
                continue
            spent += int(score.get("generated_tokens") or score.get("completion_tokens", 0))
        totals.append(spent)
    return mean(totals)


def per_problem(records: Sequence[ProblemRecord], metric: str, planned: Sequence[str] | None = None,
                repeats: int | None = None) -> dict[str, float]:
    """One value per planned problem (repeats averaged): ``avg``, ``majority`` or ``pass_at_n`` of the
    scored population, or ``final`` (the returned answer), the unit a problem-level interval resamples."""
    return problem_means(units(plan_of(records, planned, repeats), metric))


def per_problem_round(records: Sequence[ProblemRecord], round_index: int, planned: Sequence[str] | None = None,
                      repeats: int | None = None) -> list[float]:
    """avg@N of one round, one value per problem (repeats averaged; stopped runs carried forward)."""
    return list(problem_means(units(plan_of(records, planned, repeats), "avg", round_index)).values())
