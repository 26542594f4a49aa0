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
import dataclasses
import hashlib
import json
import logging
import secrets
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from markov_rsa.backends.base import NORMAL_FINISH, Backend, Message, SamplingParams
from markov_rsa.errors import BackendError, BackendRequestError, BackendUnavailableError
from markov_rsa.rsa.answers import tool_calls_key
from markov_rsa.rsa.config import RSAConfig
from markov_rsa.rsa.consensus import exits_early, round_agreement
from markov_rsa.rsa.events import (
    CandidateFinished,
    ConsensusReached,
    Event,
    RoundFinished,
    RoundProgress,
    RoundStarted,
    RunFinished,
    RunStarted,
)
from markov_rsa.rsa.result import Candidate, RoundKind, RoundRecord, RSAResult, Selection, StopReason, Usage
from markov_rsa.rsa.rollout import rollout
from markov_rsa.rsa.tails import carried_text, last_tokens, opens_think_by_template, split_reasoning
from markov_rsa.rsa.tasks import Task, task_for
from markov_rsa.rsa.votes import Vote

logger = logging.getLogger(__name__)

#: Asked before stage ``t`` (>= 1) with the round just finished: may the run have stage ``t``?
StageGate = Callable[[int, RoundRecord], Awaitable[bool]]


def derive_seed(*parts: int) -> int:
    """A 31-bit seed that depends only on its parts, so a request's randomness is independent of
    scheduling and batching."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0]) & 0x7FFFFFFF


def sample_subsets(
    seed: int, round_index: int, available: int, population: int, k: int, *, ordered: bool = True
) -> list[list[int]]:
    """For each of ``population`` new candidates, ``k`` distinct indices into the previous round.

    Uniform without replacement; when fewer than ``k`` candidates of the previous round survived,
    each subset holds all of them. ``ordered=False`` keeps the seeded random order in which they
    were drawn (the order the prompt presents them in).
    """
    rng = np.random.default_rng(np.random.SeedSequence([seed, round_index]))
    size = min(k, available)
    subsets = [[int(i) for i in rng.choice(available, size=size, replace=False)] for _ in range(population)]
    return [sorted(s) for s in subsets] if ordered else subsets


def lineage_parents(previous: Sequence[Candidate], count: int) -> list[list[int]]:
    """K=1: child i continues parent i, so no lineage dies; a failed parent's child continues a
    survivor (positions into ``previous``, cycling deterministically)."""
    position = {c.index: p for p, c in enumerate(previous)}
    return [[position.get(i, i % len(previous))] for i in range(count)]


class _LimitReached(Exception):
    def __init__(self, reason: StopReason) -> None:
        self.reason = reason


@dataclass
class _Run:
    problem: str
    config: RSAConfig
    seed: int
    #: What comes before the problem in every prompt (system messages, a conversation's earlier turns),
    #: and what follows it (an agent's tool calls and their results).
    context: tuple[Message, ...] = ()
    trailing: tuple[Message, ...] = ()
    #: Per-request options for every generation (tools, tool_choice, pass-through fields).
    options: dict[str, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)
    usage: Usage = field(default_factory=Usage)
    rounds: list[RoundRecord] = field(default_factory=list)
    #: Set when consensus ended the run early (see RSAResult.consensus).
    consensus: dict[str, Any] | None = None
    #: Tokens each unfinished candidate of the current stage has streamed so far.
    streamed: dict[int, int] = field(default_factory=dict)

    @property
    def affinity(self) -> str:
        """Every prompt of the run starts with the problem: one routing key keeps them on one replica."""
        head = json.dumps(self.context, sort_keys=True, default=str) + self.problem
        return hashlib.blake2b(head.encode(), digest_size=8).hexdigest()

    def remaining_time(self) -> float | None:
        if self.config.time_limit is None:
            return None
        return self.config.time_limit - (time.perf_counter() - self.started)

    def over_token_budget(self) -> bool:
        budget = self.config.token_budget
        return budget is not None and self.usage.generated_tokens >= budget


class MarkovianRSA:
    """Runs Markovian RSA over a backend. One instance may serve many concurrent ``solve`` calls."""

    def __init__(self, backend: Backend, config: RSAConfig | None = None, *, task: Task | None = None,
                 progress_interval: float = 0.5) -> None:
        self.backend = backend
        self.config = config or RSAConfig()
        self.task = task or task_for(self.config.task, self.config.prompt_version)
        #: Seconds between two RoundProgress events of a stage (they come only when tokens moved).
        self.progress_interval = progress_interval
        #: Seen a reply that closes a think block it never opened: the chat template opens it, so a
        #: reply cut at the budget without ``</think>`` was cut inside its reasoning (the server may not
        #: say so when it has no tokenize endpoint to render the template with).
        self._template_opens_think = False

    async def solve(self, problem: str, **request: Any) -> RSAResult:
        """Run to the end; ``request`` takes :meth:`stream`'s keyword arguments."""
        async with contextlib.aclosing(self.stream(problem, **request)) as events:
            async for event in events:
                if isinstance(event, RunFinished):
                    return event.result
        raise RuntimeError("run ended without a result")  # pragma: no cover - stream always finishes

    async def stream(
        self, problem: str, *, context: Sequence[Message] = (), trailing: Sequence[Message] = (),
        tools: Sequence[dict[str, Any]] = (), tool_choice: Any = None, extra: dict[str, Any] | None = None,
        gate: StageGate | None = None,
    ) -> AsyncGenerator[Event, None]:
        """Yield the run's events; the last is :class:`RunFinished`. Closing the iterator cancels the
        run's outstanding requests.

        ``context`` goes before the problem in every prompt (system messages, earlier turns). With
        ``tools`` every rollout may call them: a candidate that ends in tool calls is a candidate like
        any other, and they vote in their canonical form. ``extra`` fields go to every request as they
        are (``response_format``...). ``gate`` is asked before every stage after round 0 whether the
        run may have it (a scheduler sharing one budget across problems); ``False`` ends the run."""
        cfg = self.config
        options: dict[str, Any] = {"tools": tuple(tools), "tool_choice": tool_choice, "extra": dict(extra or {})}
        run = _Run(problem, cfg, cfg.seed if cfg.seed is not None else secrets.randbelow(2**31),
                   context=tuple(context), trailing=tuple(trailing), options=options)
        yield RunStarted(problem=problem, seed=run.seed, stages=cfg.rounds + 1)
        stop: StopReason = "complete"
        remaining = run.remaining_time()
        try:  # the run's time limit covers the backend's start-up probe too
            await (self.backend.ready() if remaining is None else asyncio.wait_for(self.backend.ready(), remaining))
        except TimeoutError:
            logger.warning("the time limit (%gs) ran out before the backend was ready", cfg.time_limit)
            yield RunFinished(await self._finish(run, "time_limit", False))
            return
        exact = self.backend.info.tokenizer == "exact"
        try:
            previous: list[Candidate] = []
            aggregate = cfg.final == "aggregate"
            for t in range(cfg.rounds + 1 + aggregate):
                if t:  # between stages: consensus may end the run, a shared budget may withhold the next stage
                    early = await self._between(run, t, gate)
                    if early is not None:
                        stop = early
                        if run.consensus is not None:
                            yield ConsensusReached(**run.consensus)
                        break
                if t > cfg.rounds:
                    break
                kind: RoundKind = "initial" if t == 0 else "aggregate"
                budget = cfg.last_stage_budget if t == cfg.rounds and not aggregate else cfg.budget
                stage = self._round(run, t, kind, previous, cfg.population, exact, budget)
                async with contextlib.aclosing(stage) as it:
                    async for event in it:
                        yield event
                previous = [c for c in run.rounds[-1].candidates if c.ok]
            if aggregate and stop == "complete":
                final = self._round(run, cfg.rounds + 1, "final", previous, cfg.final_n, exact,
                                    cfg.last_stage_budget)
                async with contextlib.aclosing(final) as it:
                    async for event in it:
                        yield event
        except _LimitReached as limit:
            stop = limit.reason
        yield RunFinished(await self._finish(run, stop, exact))

    async def _between(self, run: _Run, stage: int, gate: StageGate | None) -> StopReason | None:
        """Before stage ``stage``: ``consensus`` when the last round agrees enough, ``total_token_budget``
        when the gate withholds the stage, else None (go on)."""
        last = run.rounds[-1]
        if self.config.early_exit is not None:
            agreement = await round_agreement(self.task, last.candidates)
            if exits_early(self.config, last.index, agreement):
                run.consensus = {"round": last.index, "agreement": agreement, "threshold": self.config.early_exit}
                logger.debug("round %d: %.0f%% agree, stopping early", last.index, 100 * agreement)
                return "consensus"
        if gate is not None and not await gate(stage, last):
            return "total_token_budget"
        return None

    # -- one stage ----------------------------------------------------------------------------
    async def _round(
        self, run: _Run, t: int, kind: RoundKind, previous: Sequence[Candidate], count: int, exact: bool,
        budget: int,
    ) -> AsyncGenerator[Event, None]:
        cfg = self.config
        record = RoundRecord(index=t, kind=kind, requested=count, budget=budget)
        run.rounds.append(record)
        started = time.perf_counter()
        plans: list[tuple[tuple[int, ...], tuple[Message, ...]]]
        if kind == "initial":
            plans = [((), self.task.prompts.initial_messages(run.problem, run.context, run.trailing))
                     for _ in range(count)]
        else:
            if cfg.k == 1:
                subsets = lineage_parents(previous, count)
            else:
                subsets = sample_subsets(run.seed, t, len(previous), count, cfg.k,
                                         ordered=not self.task.prompts.shuffle)
            plans = [
                (
                    tuple(previous[j].index for j in subset),
                    self.task.prompts.aggregation_messages(run.problem, [previous[j].tail for j in subset],
                                                           run.context, run.trailing),
                )
                for subset in subsets
            ]
        yield RoundStarted(round=t, round_kind=kind, requests=count)
        run.streamed = {}
        reported = 0
        tasks = [
            asyncio.create_task(self._candidate(run, t, i, kind, parents, messages, exact, budget))
            for i, (parents, messages) in enumerate(plans)
        ]
        try:
            pending: set[asyncio.Task[Candidate]] = set(tasks)
            while pending:
                remaining = run.remaining_time()
                if remaining is not None and remaining <= 0:
                    raise _LimitReached("time_limit")
                wake = self.progress_interval if remaining is None else min(remaining, self.progress_interval)
                done, pending = await asyncio.wait(pending, timeout=wake, return_when=asyncio.FIRST_COMPLETED)
                for finished in sorted(done, key=tasks.index):
                    candidate = finished.result()  # a fatal backend error propagates from here
                    run.streamed.pop(candidate.index, None)
                    record.candidates.append(candidate)
                    record.usage.add(candidate.usage)
                    run.usage.add(candidate.usage)
                    yield CandidateFinished(candidate)
                streaming = record.usage.generated_tokens + sum(run.streamed.values())
                if pending and not done and streaming != reported:
                    reported = streaming
                    yield RoundProgress(round=t, round_kind=kind, tokens=streaming,
                                        finished=len(record.candidates), requests=count)
                if run.over_token_budget() and pending:
                    raise _LimitReached("token_budget")
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            # Tokens that cancelled candidates had streamed were paid for: they count as discarded.
            cut = Usage(discarded_tokens=sum(run.streamed.values()))
            record.usage.add(cut)
            run.usage.add(cut)
            run.streamed = {}
            record.candidates.sort(key=lambda c: c.index)
            record.seconds = time.perf_counter() - started
        if self._template_opens_think:  # candidates that finished before the evidence came in
            for c in record.candidates:
                if c.ok and c.finish_reason == "length" and c.finished and c.text == c.reasoning and not c.tool_calls:
                    c.text, c.answer, c.finished = "", None, False
        ok = [c for c in record.candidates if c.ok]
        answers = tuple(c.answer for c in record.candidates)
        tally = await asyncio.to_thread(self.task.vote, [c.answer for c in ok])
        yield RoundFinished(
            round=t,
            round_kind=kind,
            answers=answers,
            majority=tally.answer,
            agreement=tally.votes / len(record.candidates) if record.candidates else 0.0,
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
            stop=cfg.stop,
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
        budget: int,
    ) -> Candidate:
        cfg = self.config
        candidate = Candidate(round=t, index=i, parents=list(parents))
        error: BackendError | None = None
        spent = Usage()  # every attempt's tokens were paid for
        for attempt in range(cfg.candidate_retries + 1):

            def sampling(chunk: int, attempt: int = attempt) -> SamplingParams:
                return self._sampling(run, t, i, kind, attempt, chunk)

            try:
                run.streamed[i] = 0
                out = await rollout(
                    self.backend,
                    messages,
                    cfg,
                    sampling,
                    exact_tokens=exact,
                    budget=budget,
                    tags={"round": t, "index": i, "attempt": attempt},
                    affinity=run.affinity,
                    on_progress=lambda tokens: run.streamed.__setitem__(i, tokens),
                    options=run.options,
                )
            except BackendRequestError:
                raise
            except BackendError as exc:
                error = exc
                spent.discarded_tokens += run.streamed.pop(i, 0)  # what its last try streamed was paid for
                logger.debug("round %d candidate %d attempt %d failed: %s", t, i, attempt, exc)
                continue
            spent.add(out.usage)
            finish = out.generation.finish_reason
            if finish not in NORMAL_FINISH:
                # abort, content_filter...: not a finished answer; retried like a failed request
                candidate.finish_reason = finish
                error = BackendUnavailableError(f"the server ended the generation with finish_reason {finish!r}")
                logger.debug("round %d candidate %d attempt %d ended with %s", t, i, attempt, finish)
                continue
            gen = out.generation
            if gen.reasoning is None and not gen.think_opened and opens_think_by_template(gen.text):
                self._template_opens_think = True  # this model's template opens <think>: the server did not say
            if self._template_opens_think and gen.reasoning is None and not gen.think_opened:
                gen = dataclasses.replace(gen, think_opened=True)
            split = split_reasoning(gen)
            candidate.text = split.answer
            candidate.reasoning = split.reasoning
            candidate.finished = split.finished
            candidate.finish_reason = finish
            # A rollout cut off inside its reasoning has no answer yet: an intermediate \boxed{} never votes.
            candidate.answer = self.task.extract_answer(split.answer) if split.answer and split.finished else None
            if out.generation.tool_calls:  # an agent's step: the calls are its answer
                candidate.tool_calls = [dict(c) for c in out.generation.tool_calls]
                candidate.answer = tool_calls_key(candidate.tool_calls)
            candidate.usage = spent
            candidate.chunks = out.chunks
            candidate.seconds = out.seconds
            candidate.tail_approximate = out.approximate
            carried = carried_text(split, cfg.tail_source)
            if candidate.tool_calls:
                carried = (carried + "\n" + _render_calls(candidate.tool_calls)).strip()
            whole = carried == gen.text and gen.reasoning is None
            known = gen.completion_tokens if whole and exact and out.chunks == 1 else None
            ids = None  # the carried text's own ids, where the backend returned them
            if gen.token_ids is not None and out.chunks == 1:
                if whole:
                    ids = gen.token_ids
                elif gen.reasoning is not None and carried == split.reasoning and gen.reasoning_tokens is not None:
                    ids = gen.token_ids[: gen.reasoning_tokens]
            try:
                candidate.tail, candidate.tail_tokens = await last_tokens(
                    self.backend, carried, cfg.tail, exact=exact, known_tokens=known, ids=ids)
            except BackendError as exc:  # the tokenizer failed: this tail is approximate, the run goes on
                logger.warning("round %d candidate %d: cutting the tail failed (%s); using an approximate tail",
                               t, i, exc)
                candidate.tail, candidate.tail_tokens = await last_tokens(self.backend, carried, cfg.tail, exact=False)
                candidate.tail_approximate = True
            return candidate
        candidate.error = str(error)
        candidate.usage = spent
        if candidate.finish_reason in NORMAL_FINISH:
            candidate.finish_reason = "error"
        return candidate

    # -- final selection ----------------------------------------------------------------------
    def _choose(self, run: _Run, stop: StopReason) -> tuple[list[Candidate], Selection]:
        """The candidates that vote, and why those (see :data:`~markov_rsa.rsa.result.Selection`)."""
        stages = [r for r in run.rounds if r.kind != "final"]
        usable = [r for r in stages if any(c.ok for c in r.candidates)]
        complete = [r for r in usable if r.complete]
        pool_round = complete[-1] if complete else (usable[-1] if usable else None)
        pool = [c for c in pool_round.candidates if c.ok] if pool_round else []
        if self.config.final == "population":
            return pool, "population"
        if not pool:
            return [], "none"
        if stop in ("consensus", "total_token_budget"):  # stopped between stages: the last round votes
            return pool, "majority"
        cut_short = not stages[-1].complete
        if self.config.final == "aggregate" and not cut_short:
            final = run.rounds[-1] if run.rounds[-1].kind == "final" else None
            if final is not None and final.complete and any(c.ok and c.answer is not None for c in final.candidates):
                return [c for c in final.candidates if c.ok], "final_aggregate"
            return pool, "majority_after_final"
        return pool, "last_complete_round" if pool_round is not stages[-1] else "majority"

    async def _finish(self, run: _Run, stop: StopReason, exact: bool) -> RSAResult:
        cfg = self.config
        pool, selection = self._choose(run, stop)
        chosen: Candidate | None = None
        votes = 0
        tally = Vote()
        if pool and selection != "population":
            position, votes = await self.task.select(pool)
            chosen = pool[position] if position is not None else pool[0]
            tally = await asyncio.to_thread(self.task.vote, [c.answer for c in pool])  # pairs are cached
            if tally.undecided:
                logger.warning("the vote left %d answer pairs to canonical keys (%s could not decide them)",
                               tally.undecided, tally.equivalence)
        info = self.backend.info
        sampling = {"rollout": self._stated(self._sampling(run, 0, 0, "initial", 0, 0))}
        if cfg.final == "aggregate":
            sampling["final"] = self._stated(self._sampling(run, 0, 0, "final", 0, 0))
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
            tails_approximate=not exact or any(c.tail_approximate for r in run.rounds for c in r.candidates),
            selection=selection,
            sampling=sampling,
            consensus=run.consensus,
            equivalence=tally.equivalence,
            vote_undecided=tally.undecided,
        )

    @staticmethod
    def _stated(params: SamplingParams) -> dict[str, Any]:
        return {"temperature": params.temperature, "top_p": params.top_p, "top_k": params.top_k}


def _render_calls(calls: Sequence[dict[str, Any]]) -> str:
    """Tool calls as the text the next round sees of a candidate that made them."""
    lines = []
    for call in calls:
        function = call.get("function") or {}
        lines.append(f"[calls tool {function.get('name')} with arguments {function.get('arguments')}]")
    return "\n".join(lines)


def solve(
    problem: str,
    *,
    backend: Backend,
    config: RSAConfig | None = None,
    preset: str | None = None,
    task: Task | None = None,
    **overrides: object,
) -> RSAResult:
    """Blocking convenience wrapper for scripts: ``solve("...", backend=b, preset="light", seed=1)``.

    Inside a running event loop (a notebook, an async application) it cannot block; there, use
    ``await MarkovianRSA(backend, config).solve(problem)``."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        raise RuntimeError("markov_rsa.solve() blocks, so it cannot run inside a running event loop (a notebook, "
                           "an async application); there, use: result = await MarkovianRSA(backend, config)"
                           ".solve(problem)")
    if config is None:
        config = RSAConfig.from_preset(preset, **overrides) if preset else RSAConfig(**overrides)  # type: ignore[arg-type]
    elif overrides:
        config = config.replace(**overrides)
    return asyncio.run(MarkovianRSA(backend, config, task=task).solve(problem))
