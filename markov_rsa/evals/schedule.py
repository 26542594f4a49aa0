"""One token budget across a benchmark: the next round goes where another round can still change the answer.

Every problem runs its round 0 (without it there is no answer). After that, problems advance in waves:
when every unfinished problem has finished a round and asks for its next stage, the scheduler orders
them by their last round's agreement (least first: a split population is where another round can still
change the vote; a unanimous one almost never changes) and grants each, in that order, whose estimated
cost still fits the budget: its last round's longest candidate times the next stage's requests, so
that the spend passes the budget only when a round's candidates grow longer than the longest before
them (the spend is reported, never hidden). A problem
refused a stage stops, and its last round votes. Decisions depend only on the logged rounds, never on
timing, so a seed gives the same schedule; a resumed run counts what its finished problems spent.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

JobKey = tuple[str, int]


@dataclass
class _Ask:
    order: int
    agreement: float
    estimate: int
    answer: asyncio.Future[bool]


@dataclass
class JobSpend:
    """What one problem and repeat was given: stages run and tokens generated."""

    stages: int = 1
    tokens: int = 0
    refused: bool = False


@dataclass
class RoundScheduler:
    """Grants stages to waiting problems in waves (see the module's docstring)."""

    budget: int
    #: Problem repeats that will run in this process.
    jobs: int
    #: Tokens spent before (a resumed run's finished problems).
    spent_before: int = 0
    spend: dict[JobKey, JobSpend] = field(default_factory=dict)
    waves: int = 0
    _finished: set[JobKey] = field(default_factory=set)
    _waiting: dict[JobKey, _Ask] = field(default_factory=dict)

    @property
    def spent(self) -> int:
        return self.spent_before + sum(s.tokens for s in self.spend.values())

    async def ask(self, key: JobKey, order: int, agreement: float, round_tokens: int, estimate: int) -> bool:
        """May ``key`` have its next stage? ``round_tokens`` is what its last round generated, ``estimate``
        what the next stage is expected to."""
        job = self.spend.setdefault(key, JobSpend())
        job.tokens += round_tokens
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._waiting[key] = _Ask(order, agreement, estimate, future)
        self._decide()
        granted = await future
        if granted:
            job.stages += 1
        else:
            job.refused = True
        return granted

    def finished(self, key: JobKey, tokens: int | None) -> None:
        """``key`` has ended (its total tokens; None when it failed), so it no longer holds a wave back."""
        self._finished.add(key)
        if tokens is not None:
            self.spend.setdefault(key, JobSpend()).tokens = tokens
        self._decide()

    def _decide(self) -> None:
        if not self._waiting or len(self._waiting) + len(self._finished) < self.jobs:
            return  # a problem is still generating: its agreement and tokens are not known yet
        self.waves += 1
        reserved = self.spent
        for key, ask in sorted(self._waiting.items(), key=lambda item: (item[1].agreement, item[1].order)):
            grant = reserved + ask.estimate <= self.budget
            if grant:
                reserved += ask.estimate
            logger.debug("wave %d: %s#%d (agreement %.2f, ~%d tokens): %s", self.waves, key[0], key[1],
                         ask.agreement, ask.estimate, "granted" if grant else "refused")
            ask.answer.set_result(grant)
        self._waiting.clear()

    def summary(self) -> dict[str, Any]:
        """What the budget was spent on: per problem repeat, stages run and tokens."""
        return {
            "total_token_budget": self.budget, "spent": self.spent, "spent_before": self.spent_before,
            "waves": self.waves,
            "problems": {f"{pid}#{repeat}": {"stages": s.stages, "tokens": s.tokens, "stopped_by_budget": s.refused}
                         for (pid, repeat), s in sorted(self.spend.items())},
        }
