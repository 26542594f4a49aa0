"""Math grading: the last ``\\boxed{}`` answer, by symbolic equivalence (math-verify).

math-verify enforces its timeouts with signals, which only work in a process's main thread, so
grading runs in a process pool (one call per item, each in a worker's main thread) with a
per-item deadline on top; a worker that overruns it is replaced.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import multiprocessing
import re
from collections.abc import Sequence

from markov_rsa.errors import MissingDependencyError

_INT = re.compile(r"[+-]?\d+")
_THOUSANDS = re.compile(r"[+-]?\d{1,3}(,\d{3})+")


def _as_int(text: str) -> int | None:
    """The integer an answer states, as a careful human grader reads it: ``042``, ``42.``, ``1,000``,
    ``42^\\circ`` and ``\\text{42}`` are integers; ``3,4`` (a list) and ``4.5`` are not."""
    s = re.sub(r"\\[!; ]|\$|\s|\\text\{\s*\}|\^\\circ|\^\{\\circ\}", "", text)
    s = re.sub(r"\\(?:text|mathrm|textbf|mathbf)\{([^{}]*)\}", r"\1", s).replace("\\,", ",")
    s = s.removeprefix("{").removesuffix("}").rstrip(".;:!")
    if _THOUSANDS.fullmatch(s):
        s = s.replace(",", "")
    return int(s) if _INT.fullmatch(s) else None


def grade_one(prediction: str | None, gold: str, integer: bool, timeout: int = 5) -> bool:
    """True when ``prediction`` (an extracted answer, not a whole reply) equals ``gold``."""
    if prediction is None or not prediction.strip():
        return False
    if integer:
        mine, theirs = _as_int(prediction), _as_int(gold)
        if mine is not None and theirs is not None:
            return mine == theirs
    from math_verify import parse, verify

    gold_parsed = parse(f"${gold}$", parsing_timeout=timeout)
    pred_parsed = parse(f"\\boxed{{{prediction}}}", parsing_timeout=timeout)
    if not gold_parsed or not pred_parsed:
        return False
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=timeout))


class MathGrader:
    """Grades answers in worker processes; safe to share between concurrent evaluation tasks."""

    def __init__(self, workers: int = 2, timeout: float = 10.0) -> None:
        try:
            import math_verify  # noqa: F401
        except ImportError:
            raise MissingDependencyError("math grading needs math-verify: pip install 'markov-rsa[evals]'") from None
        self.workers = workers
        self.timeout = timeout
        self._pool = self._new_pool()

    def _new_pool(self) -> concurrent.futures.ProcessPoolExecutor:
        return concurrent.futures.ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"))

    async def grade(self, prediction: str | None, gold: str, integer: bool) -> bool:
        if prediction is None or not prediction.strip():
            return False
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self._pool, grade_one, prediction, gold, integer)
        try:
            return await asyncio.wait_for(future, self.timeout)
        except (asyncio.TimeoutError, concurrent.futures.process.BrokenProcessPool):
            self._restart()
            return False
        except Exception:  # a parser crash on adversarial input grades wrong, never crashes the run
            return False

    async def grade_many(self, items: Sequence[tuple[str | None, str, bool]]) -> list[bool]:
        return list(await asyncio.gather(*(self.grade(*item) for item in items)))

    def _restart(self) -> None:
        old, self._pool = self._pool, self._new_pool()
        for process in list(getattr(old, "_processes", {}).values()):
            process.kill()
        old.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> MathGrader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
