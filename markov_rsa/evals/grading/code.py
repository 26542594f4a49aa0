"""Code grading as LiveCodeBench does it: every test in a sandboxed process, compared line by line.

stdin problems compare stripped lines, falling back to exact decimal comparison token by token;
call-based (LeetCode) problems call ``Solution().func(*args)`` with JSON-decoded arguments and
compare JSON values with tuples read as lists; what such a program prints is discarded. Whatever a
program writes ends in a verdict: the comparison (:mod:`.compare`) is total and bounded, and it
runs with the program, in a worker thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from markov_rsa.evals.datasets import CodeTest, Problem
from markov_rsa.evals.grading.compare import functional_matches, stdin_matches
from markov_rsa.evals.grading.sandbox import Sandbox

__all__ = ["CodeGrader", "TestReport", "functional_matches", "stdin_matches"]

log = logging.getLogger("markov_rsa.evals.grading")


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
        """Whether the program passes the test, and the verdict ("ok", "wrong answer" or the run's status)."""
        async with self._semaphore():
            return await asyncio.to_thread(self._run_and_compare, program, test, func_name)

    def _run_and_compare(self, program: str, test: CodeTest, func_name: str | None) -> tuple[bool, str]:
        functional = bool(test.testtype == "functional" and func_name)
        outcome = self.sandbox.run(program, test.input, func_name=func_name if functional else None)
        if outcome.status != "ok":
            return False, outcome.status
        # A call-based program's prints are discarded, as LiveCodeBench's harness does; its return value
        # arrives on a channel of its own.
        try:
            ok = (functional_matches(outcome.result or "", test.output) if functional
                  else stdin_matches(outcome.stdout, test.output))
        except Exception as exc:  # the comparison is total; should it ever fail, the program fails, not the run
            log.warning("output comparison failed (%s: %s); graded wrong", type(exc).__name__, exc)
            return False, "unreadable output"
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
