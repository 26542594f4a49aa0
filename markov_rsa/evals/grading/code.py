"""Code grading as LiveCodeBench does it: every test in a sandboxed process, compared line by line.

stdin problems compare stripped lines, falling back to exact decimal comparison token by token;
call-based (LeetCode) problems call ``Solution().func(*args)`` with JSON-decoded arguments and
compare JSON values with tuples read as lists; what such a program prints is discarded.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

from markov_rsa.evals.datasets import CodeTest, Problem
from markov_rsa.evals.grading.sandbox import Sandbox


def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.strip().split("\n")]


def _decimals(line: str) -> list[Decimal] | None:
    try:
        return [Decimal(token) for token in line.split()]
    except InvalidOperation:
        return None


def stdin_matches(actual: str, expected: str) -> bool:
    got, want = _lines(actual), _lines(expected)
    if len(got) != len(want):
        return False
    for a, b in zip(got, want, strict=True):
        if a == b:
            continue
        da, db = _decimals(a), _decimals(b)
        if da is None or db is None or len(da) != len(db) or da != db:
            return False
    return True


def _plain(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def functional_matches(actual: str, expected: str) -> bool:
    try:
        got = json.loads(actual)
    except json.JSONDecodeError:
        return False
    try:
        want = json.loads(expected)
    except json.JSONDecodeError:
        return actual.strip() == expected.strip()
    return bool(_plain(got) == _plain(want))


@dataclass(frozen=True)
class TestReport:
    passed: int
    total: int
    failure: str | None = None

    @property
    def all_passed(self) -> bool:
        return self.total > 0 and self.passed == self.total


class CodeGrader:
    """Runs programs against tests, a bounded number of sandboxes at a time."""

    def __init__(self, sandbox: Sandbox | None = None, concurrency: int = 2) -> None:
        self.sandbox = sandbox or Sandbox()
        self._concurrency = concurrency
        self._semaphores: dict[int, asyncio.Semaphore] = {}

    def _semaphore(self) -> asyncio.Semaphore:
        loop = id(asyncio.get_running_loop())
        return self._semaphores.setdefault(loop, asyncio.Semaphore(self._concurrency))

    async def run_test(self, program: str, test: CodeTest, func_name: str | None) -> tuple[bool, str]:
        functional = test.testtype == "functional" and func_name
        async with self._semaphore():
            outcome = await asyncio.to_thread(
                self.sandbox.run, program, test.input, func_name=func_name if functional else None
            )
        if outcome.status != "ok":
            return False, outcome.status
        # A call-based program's prints are discarded, as LiveCodeBench's harness does; its return value
        # arrives on a channel of its own.
        ok = (functional_matches(outcome.result or "", test.output) if functional
              else stdin_matches(outcome.stdout, test.output))
        return ok, "ok" if ok else "wrong answer"

    async def run_tests(self, program: str | None, tests: Sequence[CodeTest], func_name: str | None, *,
                        stop_at_first_failure: bool = True) -> TestReport:
        if not program:
            return TestReport(0, len(tests), "no program")
        passed = 0
        for test in tests:
            ok, why = await self.run_test(program, test, func_name)
            if ok:
                passed += 1
            elif stop_at_first_failure:
                return TestReport(passed, len(tests), why)
        return TestReport(passed, len(tests))

    async def grade_problem(self, answer: str | None, problem: Problem) -> bool:
        """The :class:`~markov_rsa.evals.benchmarks.Grader` protocol."""
        return await self.grade(answer, problem)

    def close(self) -> None:
        """Nothing outlives a test (each runs in a process of its own that is gone when it ends)."""

    async def grade(self, program: str | None, problem: Problem) -> bool:
        tests = (*problem.public_tests, *problem.private_tests)
        return (await self.run_tests(program, tests, problem.func_name)).all_passed

    async def public_score(self, program: str, problem: Problem) -> int:
        report = await self.run_tests(program, problem.public_tests, problem.func_name, stop_at_first_failure=False)
        return report.passed
