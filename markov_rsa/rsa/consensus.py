"""Consensus: how much of a round's population agrees with its vote, and when that ends a run early.

Markovian RSA pays N rollouts per stage whether or not the population already agrees. When the share
of a round's population whose answers are equal to the vote's winner reaches ``early_exit``, another
round is very unlikely to change the answer, so the run stops and that round votes.

Agreement is measured by the vote itself: :func:`answer_agreement` is the one place that asks the
vote (the task's ``vote``, :func:`markov_rsa.rsa.votes.vote`) which answers count as equal, so whatever notion of
equal the vote uses, early exit, the what-if of logged runs and the round scheduler use the same.
Programs cannot be compared as strings: a code task with public tests measures agreement on the
chosen program's public-test outcome vector (which tests pass and which fail).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence

from markov_rsa.rsa.answers import majority
from markov_rsa.rsa.config import RSAConfig
from markov_rsa.rsa.result import Candidate
from markov_rsa.rsa.tasks import Task

#: A program's public-test outcomes (one pass/fail per public test, in the tests' order).
ProgramOutcomes = Callable[[str], Awaitable[tuple[bool, ...]]]


def answer_agreement(answers: Sequence[str | None], same: Callable[[str, str], bool] | None = None) -> float:
    """Share of the population (every candidate, failed or unanswered ones included) whose answer the
    vote counts with the winner's; 0 when nobody answered."""
    if not answers:
        return 0.0
    _, votes = majority(answers, same)
    return votes / len(answers)


async def outcome_agreement(candidates: Sequence[Candidate], chosen: int | None,
                            outcomes: ProgramOutcomes) -> float:
    """Share of the population whose program has the chosen program's public-test outcome vector
    (without public tests there is nothing to compare by but the programs' text)."""
    if not candidates or chosen is None or candidates[chosen].answer is None:
        return 0.0
    vectors = [await outcomes(c.answer) if c.ok and c.answer is not None else None for c in candidates]
    target = vectors[chosen]
    if not target:
        return answer_agreement([c.answer if c.ok else None for c in candidates])
    return sum(v == target for v in vectors) / len(candidates)


async def round_agreement(task: Task, candidates: Sequence[Candidate]) -> float:
    """The agreement of one round's population, as its task votes (see the module's docstring)."""
    outcomes: ProgramOutcomes | None = getattr(task, "outcomes", None)
    if outcomes is not None:
        chosen, _ = await task.select(candidates)
        return await outcome_agreement(candidates, chosen, outcomes)
    answers = [c.answer if c.ok else None for c in candidates]
    if not answers:
        return 0.0
    tally = await asyncio.to_thread(task.vote, answers)  # the vote's own equivalence (math-verify for math)
    return tally.votes / len(answers)


def exits_early(config: RSAConfig, round_index: int, agreement: float) -> bool:
    """Whether a complete round ``round_index`` with this agreement ends the run (the caller checks
    that stages remain: the last stage always votes anyway)."""
    threshold = config.early_exit
    return threshold is not None and round_index >= config.min_rounds and agreement >= threshold
