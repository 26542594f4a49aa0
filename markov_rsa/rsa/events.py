"""The typed events of a run: the one stream every front end (CLI, server, eval log) consumes.

Events are plain frozen dataclasses; ``kind`` is a stable string for JSON consumers, and
``to_dict`` gives a JSON-ready view without the bulky fields.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

from markov_rsa.rsa.result import Candidate, RoundKind, RSAResult, Usage


@dataclass(frozen=True)
class Event:
    kind: ClassVar[str] = "event"

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.kind, **dataclasses.asdict(self)}


@dataclass(frozen=True)
class RunStarted(Event):
    kind: ClassVar[str] = "run_started"
    problem: str
    seed: int
    stages: int


@dataclass(frozen=True)
class RoundStarted(Event):
    kind: ClassVar[str] = "round_started"
    round: int
    round_kind: RoundKind
    requests: int


@dataclass(frozen=True)
class RoundProgress(Event):
    """While a stage runs: tokens generated so far in it (streamed counts), rate-limited."""

    kind: ClassVar[str] = "round_progress"
    round: int
    round_kind: RoundKind
    tokens: int
    finished: int
    requests: int


@dataclass(frozen=True)
class CandidateFinished(Event):
    kind: ClassVar[str] = "candidate_finished"
    candidate: Candidate

    def to_dict(self) -> dict[str, Any]:
        c = self.candidate
        return {
            "type": self.kind, "round": c.round, "index": c.index, "answer": c.answer,
            "finish_reason": c.finish_reason, "completion_tokens": c.usage.completion_tokens,
            "tail_tokens": c.tail_tokens, "seconds": round(c.seconds, 3), "error": c.error,
        }


@dataclass(frozen=True)
class RoundFinished(Event):
    kind: ClassVar[str] = "round_finished"
    round: int
    round_kind: RoundKind
    answers: tuple[str | None, ...]
    majority: str | None
    agreement: float
    usage: Usage
    seconds: float
    failed: int


@dataclass(frozen=True)
class ConsensusReached(Event):
    """Early exit: ``agreement`` of round ``round``'s population reached ``threshold``; that round votes."""

    kind: ClassVar[str] = "consensus_reached"
    round: int
    agreement: float
    threshold: float


@dataclass(frozen=True)
class RunFinished(Event):
    kind: ClassVar[str] = "run_finished"
    result: RSAResult

    def to_dict(self) -> dict[str, Any]:
        r = self.result
        return {
            "type": self.kind, "answer": r.answer, "stop_reason": r.stop_reason, "votes": r.votes,
            "usage": dataclasses.asdict(r.usage), "seconds": round(r.seconds, 3),
        }
