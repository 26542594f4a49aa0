"""The benchmark registry: adding a benchmark is one :func:`register` call.

A benchmark names its loader, the kind of answer it grades (an integer, a math expression or a
program), the prompt set its problems are posed with, and a grader that follows the
:class:`Grader` protocol. The CLI, the runner and the report read everything from here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, Protocol, runtime_checkable

from markov_rsa.errors import ConfigError
from markov_rsa.evals.datasets import MATH_SETS, Problem, load_lcb, load_math

AnswerKind = Literal["integer", "expression", "program"]


@runtime_checkable
class Grader(Protocol):
    """Decides whether an extracted answer solves a problem. A grader must not raise on hostile or
    malformed answers (they grade wrong), and ``close`` releases its workers."""

    async def grade_problem(self, answer: str | None, problem: Problem) -> bool: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class Benchmark:
    name: str
    description: str
    #: ``load(data_dir, **options)``: the problems (options such as a LiveCodeBench release).
    load: Callable[..., list[Problem]]
    answer: AnswerKind
    #: The prompt set the problems are posed with (see ``markov_rsa.rsa.prompts``).
    prompts: str
    #: Makes the grader for this benchmark's answers (one per run, shared by its problems).
    grader: Callable[..., Grader]

    @property
    def kind(self) -> Literal["math", "code"]:
        return "code" if self.answer == "program" else "math"


def _math_grader(**options: Any) -> Grader:
    from markov_rsa.evals.grading.math import MathGrader

    return MathGrader()


def _code_grader(*, isolation: str = "bwrap", **options: Any) -> Grader:
    from markov_rsa.evals.grading.code import CodeGrader
    from markov_rsa.evals.grading.sandbox import Sandbox

    return CodeGrader(Sandbox(isolation="rlimits" if isolation == "rlimits" else "bwrap"))


_REGISTRY: dict[str, Benchmark] = {}
#: Every registered benchmark, by name (read-only; add with :func:`register`).
BENCHMARKS: Mapping[str, Benchmark] = MappingProxyType(_REGISTRY)


def register(benchmark: Benchmark) -> Benchmark:
    """Add a benchmark (a name may be registered once)."""
    if benchmark.name in _REGISTRY:
        raise ValueError(f"benchmark {benchmark.name!r} is already registered")
    _REGISTRY[benchmark.name] = benchmark
    return benchmark


def unregister(name: str) -> None:
    """Remove a benchmark (for plugins and tests that registered one for a while)."""
    _REGISTRY.pop(name, None)


def benchmark(name: str) -> Benchmark:
    if name not in _REGISTRY:
        raise ConfigError("task", f"unknown benchmark {name!r}; choose one of {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def _math_loader(name: str) -> Callable[..., list[Problem]]:
    def load(data_dir: str | Path | None = None, **options: Any) -> list[Problem]:
        given = [key for key, value in options.items() if value is not None]
        if given:  # a filter that would do nothing is an error, not a silent no-op
            raise ConfigError(given[0], f"--{given[0]} applies to LiveCodeBench (lcb) only, not to {name}")
        return load_math(name, data_dir)

    return load


def load_task(
    task: str, data_dir: str | Path | None = None, *, release: str | None = None, since: str | None = None,
    until: str | None = None,
) -> list[Problem]:
    """The problems of a registered benchmark; options a benchmark cannot apply are refused by its loader."""
    return benchmark(task).load(data_dir, release=release, since=since, until=until)


for _name, _set in MATH_SETS.items():
    _year = "20" + _name[-2:]
    _title = f"AIME {_year}" if _name.startswith("aime") else f"HMMT February {_year}"
    register(Benchmark(_name, f"{_title} (MathArena)", _math_loader(_name),
                       "integer" if _set.integer_answers else "expression",
                       "aime" if _set.integer_answers else "math", _math_grader))

register(Benchmark("lcb", "LiveCodeBench code_generation_lite (--release, --since, --until)", load_lcb, "program",
                   "code", _code_grader))
