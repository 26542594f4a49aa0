"""The vote: answers clustered by the math grader's notion of equal, the largest cluster wins.

A careful grader calls ``x=5`` and ``5``, ``\\sqrt2/2`` and ``\\frac{\\sqrt2}{2}``, ``\\{1,2\\}`` and
``\\{2,1\\}`` the same answer, so the vote must too, or it picks winners the grader disagrees with.
Answers are first grouped by their canonical key (:func:`~markov_rsa.rsa.answers.normalize_answer`),
which is cheap and only ever merges spellings of one value. Keys that could still be equal are then
compared with the grader's own equivalence (math-verify, the ``evals`` extra), run in a worker process
so that every pair has a deadline and a runaway comparison costs only that worker; results are
cached. Where math-verify is missing, or a pair overruns its deadline, the keys decide (the pair
counts as unequal) and :attr:`Vote.undecided` says how many pairs that was.

Clusters are the connected components of "equal", so they do not depend on the order answers came
in; the winner is the cluster with most votes, ties going to the one whose first answer came first.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import select
import subprocess
import sys
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from markov_rsa.rsa.answers import TOOL_CALLS_PREFIX, normalize_answer

logger = logging.getLogger(__name__)

_INTEGER_KEY = frozenset("0123456789-")


@runtime_checkable
class Equivalence(Protocol):
    """Decides whether two answers (with different canonical keys) are the same answer."""

    @property
    def name(self) -> str: ...

    def same(self, a: str, b: str) -> bool | None:
        """True or False when decided; None when it could not decide (the keys then decide)."""
        ...


@dataclass(frozen=True)
class CanonicalEquivalence:
    """Canonical keys only: no symbolic comparison (code, free text, or no math-verify)."""

    name: str = "canonical"

    def same(self, a: str, b: str) -> bool | None:
        return normalize_answer(a) == normalize_answer(b)


@dataclass
class EquivalenceStats:
    """What the equivalence did, for logs and results: comparisons made, answered from the cache,
    and undecided (deadline overrun, a worker crash, math-verify missing)."""

    compared: int = 0
    cached: int = 0
    undecided: int = 0


def _compare_loop(timeout: int) -> None:
    """The worker (``python -c``, so no caller's main module is re-imported): answers JSON lines of
    ``[a, b]`` on stdin with math-verify, in its own main thread (its signal-based timeouts need
    that); parses are cached per answer."""
    def send(message: object) -> None:
        sys.stdout.write(json.dumps(message) + "\n")
        sys.stdout.flush()

    try:
        from math_verify import parse, verify
    except Exception as exc:  # report why; the parent falls back to keys
        send(["unavailable", f"{type(exc).__name__}: {exc}"])
        return
    send(["ready", ""])
    parsed: OrderedDict[str, list[object]] = OrderedDict()

    def parse_cached(answer: str) -> list[object]:
        if answer not in parsed:
            parsed[answer] = parse(f"\\boxed{{{answer}}}", parsing_timeout=timeout)
            if len(parsed) > 1024:
                parsed.popitem(last=False)
        return parsed[answer]

    for line in sys.stdin:
        a, b = json.loads(line)
        try:
            pa, pb = parse_cached(a), parse_cached(b)
            result: bool | None = bool(pa and pb and (verify(pa, pb, timeout_seconds=timeout)
                                                     or verify(pb, pa, timeout_seconds=timeout)))
        except Exception:  # a parser crash on odd input leaves the pair to the keys
            result = None
        send(["result", result])


class _Worker:
    """One math-verify process speaking JSON lines; killed and replaced when it overruns a deadline."""

    def __init__(self, timeout: int) -> None:
        root = str(Path(__file__).resolve().parents[2])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
        code = f"from markov_rsa.rsa.votes import _compare_loop; _compare_loop({int(timeout)})"
        self.process = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                        encoding="utf-8", env=env)

    def send(self, message: object) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(message) + "\n")
        self.process.stdin.flush()

    def receive(self, timeout: float) -> list[Any]:
        """The worker's next message; TimeoutError after ``timeout`` s, EOFError if it died."""
        assert self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        if not ready:
            raise TimeoutError
        line = self.process.stdout.readline()
        if not line:
            raise EOFError
        message: list[Any] = json.loads(line)
        return message

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=5)
        for stream in (self.process.stdin, self.process.stdout):
            if stream is not None:
                stream.close()


def _kill_worker(holder: list[_Worker]) -> None:
    for worker in holder:
        worker.kill()
    holder.clear()


class MathEquivalence:
    """The math grader's equivalence (math-verify), bounded: each pair has ``deadline`` seconds once
    the worker holds it, the worker's start-up has ``startup`` seconds, answers are compared at most
    once (a cache of ``cache_size`` pairs), and anything undecided falls back to canonical keys.

    Thread-safe; one worker process, started on the first pair that needs it and ended by
    :meth:`close` (or when the object is collected)."""

    name = "math-verify"

    def __init__(self, deadline: float = 2.0, *, startup: float = 60.0, cache_size: int = 4096,
                 max_overruns: int = 3) -> None:
        if deadline <= 0 or startup <= 0 or cache_size < 0 or max_overruns < 1:
            raise ValueError("deadline and startup must be positive, cache_size >= 0 and max_overruns >= 1")
        self.deadline = deadline
        #: After this many pairs overran their deadline (each costs a worker), only keys decide.
        self.max_overruns = max_overruns
        self._overruns = 0
        self.startup = startup
        self.cache_size = cache_size
        self.stats = EquivalenceStats()
        #: Why math-verify is not used (missing, failed to start), or None while it is.
        self.unavailable: str | None = None
        if importlib.util.find_spec("math_verify") is None:
            self.unavailable = "math-verify is not installed (pip install 'markov-rsa[evals]')"
        self._cache: OrderedDict[tuple[str, str], bool | None] = OrderedDict()
        self._lock = threading.Lock()
        self._holder: list[_Worker] = []
        self._finalizer = weakref.finalize(self, _kill_worker, self._holder)

    def same(self, a: str, b: str) -> bool | None:
        pair = (a, b) if a <= b else (b, a)
        with self._lock:
            if pair in self._cache:
                self.stats.cached += 1
                self._cache.move_to_end(pair)
                return self._cache[pair]
            self.stats.compared += 1
            result = self._compare(pair)
            if result is None:
                self.stats.undecided += 1
            if self.cache_size:
                self._cache[pair] = result
                if len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
            return result

    def _worker(self) -> _Worker | None:
        if self.unavailable is not None:
            return None
        if self._holder:
            return self._holder[0]
        worker = _Worker(max(1, round(self.deadline)))
        try:
            status, detail = worker.receive(self.startup)
        except TimeoutError:
            status, detail = "unavailable", f"it did not start within {self.startup:g} s"
        except (EOFError, OSError, ValueError) as exc:
            status, detail = "unavailable", f"the worker exited ({type(exc).__name__})"
        if status != "ready":
            worker.kill()
            self.unavailable = f"math-verify could not start: {detail}"
            logger.warning("answers vote by canonical keys only: %s", self.unavailable)
            return None
        self._holder.append(worker)
        return worker

    def _compare(self, pair: tuple[str, str]) -> bool | None:
        worker = self._worker()
        if worker is None:
            return None
        try:
            worker.send(pair)
            _, result = worker.receive(self.deadline)  # the deadline starts with the worker holding the pair
            return None if result is None else bool(result)
        except TimeoutError:
            logger.info("comparing %r with %r overran %g s; the canonical keys decide", *pair, self.deadline)
        except (EOFError, OSError, ValueError):
            logger.info("the math-verify worker died comparing %r with %r; the canonical keys decide", *pair)
        _kill_worker(self._holder)  # replaced on the next pair that needs it
        self._overruns += 1
        if self._overruns >= self.max_overruns:
            self.unavailable = f"{self._overruns} comparisons overran their deadline or crashed the worker"
            logger.warning("answers vote by canonical keys only from now on: %s", self.unavailable)
        return None

    def close(self) -> None:
        with self._lock:
            _kill_worker(self._holder)


@dataclass(frozen=True)
class Cluster:
    """Answers that are one answer: positions in the population, and the first one's text."""

    answer: str
    members: tuple[int, ...]

    @property
    def votes(self) -> int:
        return len(self.members)


@dataclass(frozen=True)
class Vote:
    """The population's clusters, most votes first (ties: the earliest first answer first)."""

    clusters: tuple[Cluster, ...] = ()
    #: Pairs the equivalence could not decide (deadline, crash, math-verify missing): the keys decided.
    undecided: int = 0
    #: Which equivalence voted (``math-verify`` or ``canonical``).
    equivalence: str = "canonical"
    #: Positions of candidates that had no answer (they do not vote).
    abstained: tuple[int, ...] = field(default=())

    @property
    def winner(self) -> int | None:
        """Position of the winning cluster's first answer, or None when nobody answered."""
        return self.clusters[0].members[0] if self.clusters else None

    @property
    def votes(self) -> int:
        return self.clusters[0].votes if self.clusters else 0

    @property
    def answer(self) -> str | None:
        return self.clusters[0].answer if self.clusters else None


def _decided_by_keys(a: str, b: str) -> bool:
    """Distinct keys that are certainly different answers: two integers, or tool calls."""
    if a.startswith(TOOL_CALLS_PREFIX) or b.startswith(TOOL_CALLS_PREFIX):
        return True
    return bool(a) and bool(b) and set(a) <= _INTEGER_KEY and set(b) <= _INTEGER_KEY


def vote(answers: Sequence[str | None], equivalence: Equivalence | None = None, *,
         time_budget: float = 30.0) -> Vote:
    """Cluster ``answers`` by ``equivalence`` (canonical keys when None) and rank the clusters.

    ``None`` answers abstain. Answers with one canonical key are one cluster without asking the
    equivalence; keys that are two different integers (or tool calls) are never asked either.
    Pairs still unasked after ``time_budget`` seconds count as undecided (the keys decide them).
    The same answers and equivalence give the same clusters and winner, whatever the order of the
    pairs' answers; ties go to the cluster whose first answer came first."""
    keys: dict[str, list[int]] = {}
    texts: dict[str, str] = {}
    abstained: list[int] = []
    for i, answer in enumerate(answers):
        if answer is None:
            abstained.append(i)
            continue
        key = normalize_answer(answer)
        keys.setdefault(key, []).append(i)
        texts.setdefault(key, answer)
    order = list(keys)  # by first appearance
    parent = list(range(len(order)))

    def root(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    undecided = 0
    name = "canonical"
    if equivalence is not None and not isinstance(equivalence, CanonicalEquivalence):
        name = equivalence.name
        give_up = time.monotonic() + time_budget
        for j in range(len(order)):
            for i in range(j):
                if root(i) == root(j) or _decided_by_keys(order[i], order[j]):
                    continue
                if time.monotonic() > give_up:
                    undecided += 1
                    continue
                same = equivalence.same(texts[order[i]], texts[order[j]])
                if same is None:
                    undecided += 1
                elif same:
                    parent[max(root(i), root(j))] = min(root(i), root(j))
    groups: dict[int, list[int]] = {}
    for position, key in enumerate(order):
        groups.setdefault(root(position), []).extend(keys[key])
    clusters = [Cluster(answers[min(m)] or "", tuple(sorted(m))) for m in groups.values()]
    clusters.sort(key=lambda c: (-c.votes, c.members[0]))
    return Vote(tuple(clusters), undecided, name, tuple(abstained))


SameFn = Callable[[str, str], bool]


@dataclass(frozen=True)
class _CallableEquivalence:
    """Adapts a plain ``same(a, b) -> bool`` function."""

    fn: SameFn
    name: str = "custom"

    def same(self, a: str, b: str) -> bool | None:
        return self.fn(a, b)


def as_equivalence(same: SameFn | Equivalence | None) -> Equivalence | None:
    """An :class:`Equivalence` from a plain function, an equivalence, or None (canonical keys)."""
    if same is None or isinstance(same, Equivalence):
        return same
    return _CallableEquivalence(same)
