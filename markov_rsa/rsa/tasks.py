"""Tasks: what a problem's answers look like and how the final candidate is chosen.

A task pairs a prompt set with answer extraction and a selection rule. Math votes over boxed
answers; code cannot vote over programs as strings, so a code task may rank candidates by the
public tests it was given (the evaluation harness supplies them).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from markov_rsa.rsa.answers import extract_boxed, extract_code
from markov_rsa.rsa.prompts import PROMPTS, PromptSet, prompt_set
from markov_rsa.rsa.result import Candidate
from markov_rsa.rsa.votes import Equivalence, MathEquivalence, Vote, vote


@runtime_checkable
class Task(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def prompts(self) -> PromptSet: ...

    def extract_answer(self, text: str) -> str | None: ...

    def vote(self, answers: Sequence[str | None]) -> Vote:
        """The answers' clusters (blocking: the engine runs it in a thread)."""
        ...

    async def select(self, candidates: Sequence[Candidate]) -> tuple[int | None, int]:
        """Position (in ``candidates``) of the chosen one and its support (votes or tests passed)."""
        ...


@dataclass(frozen=True)
class MathTask:
    """Boxed answers; the vote clusters them by the math grader's equivalence (bounded, cached)."""

    prompts: PromptSet = PROMPTS["math"]
    name: str = "math"
    equivalence: Equivalence = field(default_factory=MathEquivalence, compare=False)

    def extract_answer(self, text: str) -> str | None:
        return extract_boxed(text)

    def vote(self, answers: Sequence[str | None]) -> Vote:
        return vote(answers, self.equivalence)

    async def select(self, candidates: Sequence[Candidate]) -> tuple[int | None, int]:
        result = await asyncio.to_thread(self.vote, [c.answer for c in candidates])
        return result.winner, result.votes


@dataclass(frozen=True)
class GenericTask:
    """Free-form replies: the whole answer section is the answer; identical replies vote together."""

    prompts: PromptSet = PROMPTS["generic"]
    name: str = "generic"

    def extract_answer(self, text: str) -> str | None:
        return text.strip() or None

    def vote(self, answers: Sequence[str | None]) -> Vote:
        return vote(answers)

    async def select(self, candidates: Sequence[Candidate]) -> tuple[int | None, int]:
        result = self.vote([c.answer for c in candidates])
        return result.winner, result.votes


#: Scores one program (the number of public tests it passes).
ProgramScorer = Callable[[str], Awaitable[int]]


@dataclass(frozen=True)
class CodeTask:
    """Programs as answers. With a scorer, ``majority`` picks the candidate passing most tests; with
    ``outcomes`` (each public test's pass/fail), agreement is measured on outcome vectors."""

    prompts: PromptSet = PROMPTS["code"]
    name: str = "code"
    scorer: ProgramScorer | None = None
    outcomes: Callable[[str], Awaitable[tuple[bool, ...]]] | None = None

    def extract_answer(self, text: str) -> str | None:
        return extract_code(text)

    def vote(self, answers: Sequence[str | None]) -> Vote:
        """Identical programs (by canonical key) vote together; :meth:`select` may rank by tests."""
        return vote(answers)

    async def select(self, candidates: Sequence[Candidate]) -> tuple[int | None, int]:
        best: tuple[int | None, int] = (None, -1)
        for i, candidate in enumerate(candidates):
            if candidate.answer is None:
                continue
            score = await self.scorer(candidate.answer) if self.scorer else 0
            if score > best[1]:  # strictly greater: ties go to the earliest candidate
                best = (i, score)
        return best if best[0] is not None else (None, 0)


def task_for(name: str, prompt_version: str | None = None) -> Task:
    """The task ``name`` with its prompt set at ``prompt_version`` (the current one when ``None``)."""
    if name == "code":
        return CodeTask(prompts=prompt_set("code", prompt_version))
    if name == "generic":
        return GenericTask(prompts=prompt_set("generic", prompt_version))
    return MathTask(prompts=prompt_set("math", prompt_version))
