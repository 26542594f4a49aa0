"""Math grading: the last ``\\boxed{}`` answer, by symbolic equivalence (math-verify).

math-verify enforces its timeouts with signals, which only work in a process's main thread, so
grading runs in worker processes (one item at a time, each in a worker's main thread) with a
per-item deadline on top; a worker that overruns it is replaced.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import multiprocessing.context
import re
import signal
import threading
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection

from markov_rsa.errors import MissingDependencyError
from markov_rsa.evals.datasets import Problem

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


class _Worker:
    """One grading process; it grades one item at a time, in its main thread (math-verify's signals)."""

    def __init__(self, context: multiprocessing.context.SpawnContext, fn: GradeFn) -> None:
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_serve, args=(child, fn), daemon=True)
        self.process.start()
        child.close()

    def kill(self) -> None:
        self.process.kill()
        self.process.join(timeout=5)
        self.conn.close()


def _serve(conn: Connection, fn: GradeFn) -> None:
    # Ctrl-C reaches the whole process group: the parent stops the run; a worker ends with its pipe.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    while True:
        try:
            item = conn.recv()
        except (EOFError, OSError):
            return
        try:
            conn.send(bool(fn(*item)))
        except Exception:  # a parser crash on adversarial input grades wrong
            conn.send(False)


GradeFn = Callable[[str, str, bool], bool]


class MathGrader:
    """Grades answers in worker processes; safe to share between concurrent evaluation tasks.

    Each item's deadline starts when a worker takes it, not while it waits in line, and an item
    that overruns it costs only its own worker (killed and replaced): others grading at the same
    time are untouched. ``close()`` ends every worker; use the grader as a context manager.
    """

    def __init__(self, workers: int = 2, timeout: float = 10.0, *, grade_fn: GradeFn | None = None) -> None:
        try:
            import math_verify  # noqa: F401
        except ImportError:
            raise MissingDependencyError("math grading needs math-verify: pip install 'markov-rsa[evals]'") from None
        self.workers = workers
        self.timeout = timeout
        self._fn: GradeFn = grade_fn or grade_one
        self._context = multiprocessing.get_context("spawn")
        self._idle: list[_Worker] = []
        self._started = 0
        self._lock = threading.Lock()
        self._available = threading.Semaphore(workers)
        self._closed = False

    def _take(self) -> _Worker:
        with self._lock:
            if self._closed:
                raise RuntimeError("the math grader is closed")
            if self._idle:
                return self._idle.pop()
            self._started += 1
        return _Worker(self._context, self._fn)

    def _grade_blocking(self, item: tuple[str, str, bool]) -> bool:
        with self._available:
            worker = self._take()
            try:
                worker.conn.send(item)
                if worker.conn.poll(self.timeout):  # the deadline starts now, with a worker on it
                    result = bool(worker.conn.recv())
                    with self._lock:
                        if not self._closed:
                            self._idle.append(worker)
                            worker = None  # type: ignore[assignment]
                    return result
                return False  # overran: this worker alone is replaced
            except (EOFError, OSError, BrokenPipeError):
                return False
            finally:
                if worker is not None:
                    worker.kill()

    async def grade(self, prediction: str | None, gold: str, integer: bool) -> bool:
        if prediction is None or not prediction.strip():
            return False
        return await asyncio.to_thread(self._grade_blocking, (prediction, gold, integer))

    async def grade_problem(self, answer: str | None, problem: Problem) -> bool:
        """The :class:`~markov_rsa.evals.benchmarks.Grader` protocol: integer sets grade as integers."""
        if problem.answer is None:
            return False
        return await self.grade(answer, problem.answer, problem.integer_answers)

    async def grade_many(self, items: Sequence[tuple[str | None, str, bool]]) -> list[bool]:
        return list(await asyncio.gather(*(self.grade(*item) for item in items)))

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for worker in idle:
            worker.kill()

    def __enter__(self) -> MathGrader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
