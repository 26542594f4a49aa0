"""MarkovianRSA: the rounds of Recursive Self-Aggregation with bounded (Markovian) state.

Round 0 samples N rollouts of the problem. Each aggregation round t = 1..T regenerates N
candidates, each from a prompt with K tails drawn uniformly without replacement from round t-1
only. A tail is the last τ model tokens of what a candidate carries (its reasoning by default), so
every prompt is bounded by |problem| + K·τ + O(1) however long the run thinks.

The engine does no I/O beyond the backend and renders nothing: it yields typed events, and
``solve`` is ``stream`` drained to its final event.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field

import numpy as np

from markov_rsa.backends.base import Backend, Message, SamplingParams
from markov_rsa.errors import BackendError, BackendRequestError, BackendUnavailableError
from markov_rsa.rsa.answers import majority
from markov_rsa.rsa.config import RSAConfig
from markov_rsa.rsa.events import (
    CandidateFinished,
    Event,
    RoundFinished,
    RoundStarted,
    RunFinished,
    RunStarted,
)
from markov_rsa.rsa.result import Candidate, RoundKind, RoundRecord, RSAResult, StopReason, Usage
from markov_rsa.rsa.rollout import rollout
from markov_rsa.rsa.tails import carried_text, last_tokens, split_reasoning
from markov_rsa.rsa.tasks import Task, task_for


def derive_seed(*parts: int) -> int:
    """A 31-bit seed that depends only on its parts, so a request's randomness is independent of
    scheduling and batching."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0]) & 0x7FFFFFFF


def sample_subsets(seed: int, round_index: int, available: int, population: int, k: int) -> list[list[int]]:
    """For each of ``population`` new candidates, ``k`` distinct indices into the previous round.

    Uniform without replacement; when fewer than ``k`` candidates of the previous round survived,
    each subset holds all of them.
    """
    rng = np.random.default_rng(np.random.SeedSequence([seed, round_index]))
    size = min(k, available)
    return [sorted(int(i) for i in rng.choice(available, size=size, replace=False)) for _ in range(population)]


class _LimitReached(Exception):
    def __init__(self, reason: StopReason) -> None:
        self.reason = reason


@dataclass
class _Run:
    problem: str
    config: RSAConfig
    seed: int
    started: float = field(default_factory=time.perf_counter)
    usage: Usage = field(default_factory=Usage)
    rounds: list[RoundRecord] = field(default_factory=list)

    def remaining_time(self) -> float | None:
        if self.config.time_limit is None:
            return None
        return self.config.time_limit - (time.perf_counter() - self.started)

    def over_token_budget(self) -> bool:
        budget = self.config.token_budget
        return budget is not None and self.usage.completion_tokens >= budget


class MarkovianRSA:
    """Runs Markovian RSA over a backend. One instance may serve many concurrent ``solve`` calls."""

    def __init__(self, backend: Backend, config: RSAConfig | None = None, *, task: Task | None = None) -> None:
        self.backend = backend
        self.config = config or RSAConfig()
        self.task = task or task_for(self.config.task)

    async def solve(self, problem: str) -> RSAResult:
        async with contextlib.aclosing(self.stream(problem)) as events:
            async for event in events:
                if isinstance(event, RunFinished):
                    return event.result
        raise RuntimeError("run ended without a result")  # pragma: no cover - stream always finishes

    async def stream(self, problem: str) -> AsyncGenerator[Event, None]:
        """Yield the run's events; the last is :class:`RunFinished`. Closing the iterator cancels the
        run's outstanding requests."""
        cfg = self.config
        run = _Run(problem, cfg, cfg.seed if cfg.seed is not None else secrets.randbelow(2**31))
        yield RunStarted(problem=problem, seed=run.seed, stages=cfg.rounds + 1)
        stop: StopReason = "complete"
        await self.backend.ready()
        exact = self.backend.info.tokenizer == "exact"
        try:
            previous: list[Candidate] = []
            for t in range(cfg.rounds + 1):
                kind: RoundKind = "initial" if t == 0 else "aggregate"
                async with contextlib.aclosing(self._round(run, t, kind, previous, cfg.population, exact)) as it:
                    async for event in it:
                        yield event
                previous = [c for c in run.rounds[-1].candidates if c.ok]
            if cfg.final == "aggregate":
                final = self._round(run, cfg.rounds + 1, "final", previous, cfg.final_n, exact)
                async with contextlib.aclosing(final) as it:
                    async for event in it:
                        yield event
        except _LimitReached as limit:
            stop = limit.reason
        yield RunFinished(await self._finish(run, stop, exact))

    # -- one stage ----------------------------------------------------------------------------
    async def _round(
        self, run: _Run, t: int, kind: RoundKind, previous: Sequence[Candidate], count: int, exact: bool
    ) -> AsyncGenerator[Event, None]:
        cfg = self.config
        record = RoundRecord(index=t, kind=kind)
        run.rounds.append(record)
        started = time.perf_counter()
        plans: list[tuple[tuple[int, ...], tuple[Message, ...]]]
        if kind == "initial":
            plans = [((), self.task.prompts.initial_messages(run.problem)) for _ in range(count)]
        else:
            subsets = sample_subsets(run.seed, t, len(previous), count, cfg.k)
            plans = [
                (
                    tuple(previous[j].index for j in subset),
                    self.task.prompts.aggregation_messages(run.problem, [previous[j].tail for j in subset]),
                )
                for subset in subsets
            ]
        yield RoundStarted(round=t, round_kind=kind, requests=count)
        tasks = [
            asyncio.create_task(self._candidate(run, t, i, kind, parents, messages, exact))
            for i, (parents, messages) in enumerate(plans)
        ]
        try:
            pending: set[asyncio.Task[Candidate]] = set(tasks)
            while pending:
                remaining = run.remaining_time()
                if remaining is not None and remaining <= 0:
                    raise _LimitReached("time_limit")
                done, pending = await asyncio.wait(pending, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
                for finished in sorted(done, key=tasks.index):
                    candidate = finished.result()  # a fatal backend error propagates from here
                    record.candidates.append(candidate)
                    record.usage.add(candidate.usage)
                    run.usage.add(candidate.usage)
                    yield CandidateFinished(candidate)
                if run.over_token_budget() and pending:
                    raise _LimitReached("token_budget")
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            record.candidates.sort(key=lambda c: c.index)
            record.seconds = time.perf_counter() - started
        ok = [c for c in record.candidates if c.ok]
        answers = tuple(c.answer for c in record.candidates)
        winner, votes = majority([c.answer for c in ok])
        yield RoundFinished(
            round=t,
            round_kind=kind,
            answers=answers,
            majority=ok[winner].answer if winner is not None else None,
            agreement=votes / len(record.candidates) if record.candidates else 0.0,
            usage=record.usage,
            seconds=record.seconds,
            failed=len(record.candidates) - len(ok),
        )
        if not ok:
            errors = {c.error for c in record.candidates}
            raise BackendUnavailableError(
                f"all {count} generations of round {t} failed: {'; '.join(sorted(e for e in errors if e))}"
            )
        more_stages = t < cfg.rounds or (kind != "final" and cfg.final == "aggregate")
        if more_stages and run.over_token_budget():
            raise _LimitReached("token_budget")

    def _sampling(self, run: _Run, t: int, i: int, kind: RoundKind, attempt: int, chunk: int) -> SamplingParams:
        cfg = self.config
        final = kind == "final"
        return SamplingParams(
            temperature=cfg.final_temperature if final and cfg.final_temperature is not None else cfg.temperature,
            top_p=cfg.final_top_p if final and cfg.final_top_p is not None else cfg.top_p,
            top_k=cfg.final_top_k if final and cfg.final_top_k is not None else cfg.top_k,
            seed=derive_seed(run.seed, t, i, attempt, chunk),
        )

    async def _candidate(
        self,
        run: _Run,
        t: int,
        i: int,
        kind: RoundKind,
        parents: tuple[int, ...],
        messages: tuple[Message, ...],
        exact: bool,
    ) -> Candidate:
        cfg = self.config
        candidate = Candidate(round=t, index=i, parents=list(parents))
        error: BackendError | None = None
        for attempt in range(cfg.candidate_retries + 1):

            def sampling(chunk: int, attempt: int = attempt) -> SamplingParams:
                return self._sampling(run, t, i, kind, attempt, chunk)

            try:
                out = await rollout(
                    self.backend,
                    messages,
                    cfg,
                    sampling,
                    exact_tokens=exact,
                    tags={"round": t, "index": i, "attempt": attempt},
                )
            except BackendRequestError:
                raise
            except BackendError as exc:
                error = exc
                continue
            split = split_reasoning(out.generation)
            candidate.text = split.answer
            candidate.reasoning = split.reasoning
            candidate.finished = split.finished
            candidate.finish_reason = out.generation.finish_reason
            candidate.answer = self.task.extract_answer(split.answer) if split.answer else None
            candidate.usage = out.usage
            candidate.chunks = out.chunks
            candidate.seconds = out.seconds
            carried = carried_text(split, cfg.tail_source)
            whole = carried == out.generation.text and out.generation.reasoning is None
            candidate.tail, candidate.tail_tokens = await last_tokens(
                self.backend, carried, cfg.tail, exact=exact,
                known_tokens=out.generation.completion_tokens if whole and exact else None,
            )
            return candidate
        candidate.error = str(error)
        candidate.finish_reason = "error"
        return candidate

    # -- final selection ----------------------------------------------------------------------
    async def _finish(self, run: _Run, stop: StopReason, exact: bool) -> RSAResult:
        cfg = self.config
        pool: list[Candidate] = []
        for record in reversed(run.rounds):
            pool = [c for c in record.candidates if c.ok]
            if pool:
                break
        chosen: Candidate | None = None
        votes = 0
        if pool and cfg.final != "population":
            position, votes = await self.task.select(pool)
            chosen = pool[position] if position is not None else pool[0]
        info = self.backend.info
        return RSAResult(
            problem=run.problem,
            answer=chosen.answer if chosen else None,
            text=chosen.text if chosen else "",
            reasoning=chosen.reasoning if chosen else "",
            config=cfg,
            rounds=run.rounds,
            usage=run.usage,
            seconds=time.perf_counter() - run.started,
            seed=run.seed,
            backend={"kind": info.kind, "model": info.model, "device": info.device, "tokenizer": info.tokenizer},
            prompts={
                "name": self.task.prompts.name,
                "version": self.task.prompts.version,
                "fingerprint": self.task.prompts.fingerprint,
            },
            stop_reason=stop,
            selected=(chosen.round, chosen.index) if chosen else None,
            votes=votes,
            tails_approximate=not exact,
        )


def solve(
    problem: str,
    *,
    backend: Backend,
    config: RSAConfig | None = None,
    preset: str | None = None,
    task: Task | None = None,
    **overrides: object,
) -> RSAResult:
    """Blocking convenience wrapper for scripts: ``solve("...", backend=b, preset="light", seed=1)``."""
    if config is None:
        config = RSAConfig.from_preset(preset, **overrides) if preset else RSAConfig(**overrides)  # type: ignore[arg-type]
    elif overrides:
        config = config.replace(**overrides)
    return asyncio.run(MarkovianRSA(backend, config, task=task).solve(problem))
