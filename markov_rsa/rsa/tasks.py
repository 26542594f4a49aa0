"""Tasks: what a problem's answers look like and how the final candidate is chosen.

A task pairs a prompt set with answer extraction and a selection rule. Math votes over boxed
answers; code cannot vote over programs as strings, so a code task may rank candidates by the
public tests it was given (the evaluation harness supplies them).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from markov_rsa.rsa.answers import extract_boxed, extract_code, majority
from markov_rsa.rsa.prompts import PROMPTS, PromptSet, prompt_set
from markov_rsa.rsa.result import Candidate


@runtime_checkable
class Task(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def prompts(self) -> PromptSet: ...

    def extract_answer(self, text: str) -> str | None: ...

    async def select(self, candidates: Sequence[Candidate]) -> tuple[int | None, int]:
        """Position (in ``candidates``) of the chosen one and its support (votes or tests passed)."""
        ...


@dataclass(frozen=True)
class MathTask:
    """Boxed answers; the vote groups answers by exact value (``same`` may merge more)."""

    prompts: PromptSet = PROMPTS["math"]
    name: str = "math"
    same: Callable[[str, str], bool] | None = None

    def extract_answer(self, text: str) -> str | None:
        return extract_boxed(text)

    async def select(self, candidates: Sequence[Candidate]) -> tuple[int | None, int]:
        return majority([c.answer for c in candidates], self.same)


@dataclass(frozen=True)
class GenericTask:
    """Free-form replies: the whole answer section is the answer; identical replies vote together."""

    prompts: PromptSet = PROMPTS["generic"]
    name: str = "generic"

    def extract_answer(self, text: str) -> str | None:
        return text.strip() or None

    async def select(self, candidates: Sequence[Candidate]) -> tuple[int | None, int]:
        return majority([c.answer for c in candidates])


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
