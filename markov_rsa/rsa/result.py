"""RSAResult and its parts: everything a run produced, serialisable to JSON and back.

Every candidate of every round is kept with its extracted answer, the tail it passed on and exact
token counts, so graders, metrics and reports work from the result alone.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Literal

from markov_rsa.rsa.config import RSAConfig

RoundKind = Literal["initial", "aggregate", "final"]
StopReason = Literal["complete", "token_budget", "time_limit", "cancelled"]
#: How the answer was chosen. ``majority``: the last stage's vote; ``final_aggregate``: the vote of the
#: final aggregations; ``last_complete_round``: a limit cut a round short, so the last complete round
#: voted (early finishers are the shortest traces, a biased sample); ``majority_after_final``: the
#: final aggregations gave no answer (or were cut short), so the population voted; ``population``:
#: nothing is chosen (``final="population"``); ``none``: no candidate survived.
Selection = Literal["majority", "final_aggregate", "last_complete_round", "majority_after_final", "population",
                    "none"]


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    reasoning_tokens: int = 0
    requests: int = 0

    def add(self, other: Usage) -> None:
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        self.reasoning_tokens += other.reasoning_tokens
        self.requests += other.requests

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class Candidate:
    round: int
    index: int
    #: Indices (in the previous round) of the candidates whose tails this one aggregated.
    parents: list[int] = field(default_factory=list)
    text: str = ""
    reasoning: str = ""
    answer: str | None = None
    finished: bool = False
    finish_reason: str = "stop"
    #: What the next round sees of this candidate, and its length in model tokens.
    tail: str = ""
    tail_tokens: int = 0
    usage: Usage = field(default_factory=Usage)
    chunks: int = 1
    seconds: float = 0.0
    error: str | None = None
    #: The tokenizer failed for this candidate, so its tail was cut on an approximation.
    tail_approximate: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def completion_tokens(self) -> int:
        return self.usage.completion_tokens


@dataclass
class RoundRecord:
    index: int
    kind: RoundKind
    candidates: list[Candidate] = field(default_factory=list)
    usage: Usage = field(default_factory=Usage)
    seconds: float = 0.0
    #: Generations the stage issued; fewer candidates means a limit cut it short.
    requested: int = 0
    #: Max new tokens of each of its rollouts.
    budget: int = 0

    @property
    def complete(self) -> bool:
        return len(self.candidates) >= self.requested

    @property
    def answers(self) -> list[str | None]:
        return [c.answer for c in self.candidates]


@dataclass
class RSAResult:
    problem: str
    answer: str | None
    #: The chosen candidate's answer section (the full reply a chat client would show).
    text: str
    #: The chosen candidate's reasoning, where the model produced one.
    reasoning: str
    config: RSAConfig
    rounds: list[RoundRecord]
    usage: Usage
    seconds: float
    seed: int
    backend: dict[str, Any]
    prompts: dict[str, str]
    stop_reason: StopReason = "complete"
    #: (round, index) of the selected candidate, when one was selected.
    selected: tuple[int, int] | None = None
    votes: int = 0
    tails_approximate: bool = False
    selection: Selection = "majority"
    #: The sampling every request stated, per kind of stage (``top_k: null`` was sent as disabled).
    sampling: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def population(self) -> list[Candidate]:
        """The last complete generation stage (the final aggregations excluded)."""
        stages = [r for r in self.rounds if r.kind != "final"]
        return stages[-1].candidates if stages else []

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["config"] = self.config.to_dict()
        return data

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False, **kwargs)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RSAResult:
        rounds = [
            RoundRecord(
                index=r["index"],
                kind=r["kind"],
                candidates=[
                    Candidate(**{**c, "usage": Usage(**c["usage"])}) for c in r["candidates"]
                ],
                usage=Usage(**r["usage"]),
                seconds=r["seconds"],
                requested=r.get("requested", len(r["candidates"])),
                budget=r.get("budget", 0),
            )
            for r in data["rounds"]
        ]
        selected = tuple(data["selected"]) if data.get("selected") is not None else None
        return cls(
            **{
                **data,
                "config": RSAConfig.from_dict(data["config"]),
                "rounds": rounds,
                "usage": Usage(**data["usage"]),
                "selected": selected,
            }
        )
