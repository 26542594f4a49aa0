"""Evaluation runs: problems solved concurrently, every candidate logged as it finishes, resumable.

The directory's format belongs to :mod:`markov_rsa.evals.log`. Re-running on the same directory
skips every (problem, repeat) already complete in ``problems.jsonl``, provided everything that
changes a score matches (task, method, backend, prompts, package version, isolation, the data and
the planned problems; or ``force``); an attempt that failed, or that had generations fail, is
retried. Candidates of an attempt that was killed before its problem line was written carry an
attempt id no problem line names, so readers ignore them.

``run.json`` records the plan (the problems and repeats a report divides by), the seed (drawn and
recorded when none was given, so the run can be repeated) and where the numbers came from.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import secrets
import time
import uuid
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from markov_rsa import __version__
from markov_rsa.backends.base import Backend
from markov_rsa.errors import BackendRequestError, ConfigError
from markov_rsa.evals.benchmarks import BENCHMARKS, benchmark
from markov_rsa.evals.datasets import Problem, problems_digest
from markov_rsa.evals.grading.code import CodeGrader
from markov_rsa.evals.grading.math import MathGrader
from markov_rsa.evals.grading.sandbox import Isolation, Sandbox
from markov_rsa.evals.log import (
    CANDIDATES_FILE,
    FORMAT_VERSION,
    PROBLEMS_FILE,
    RUN_FILE,
    CandidateRecord,
    JsonlWriter,
    ProblemRecord,
    check_resumable,
    locked,
    read_meta,
    read_problems,
    write_atomic,
)
from markov_rsa.evals.metrics import RoundScore, round_score, scored_stage
from markov_rsa.evals.provenance import provenance
from markov_rsa.evals.schedule import RoundScheduler
from markov_rsa.rsa.config import RSAConfig
from markov_rsa.rsa.consensus import round_agreement
from markov_rsa.rsa.engine import MarkovianRSA, StageGate, derive_seed
from markov_rsa.rsa.events import CandidateFinished, RoundProgress, RoundStarted, RunFinished
from markov_rsa.rsa.prompts import CODE_PROBLEM_VERSION, code_problem_text, prompt_set
from markov_rsa.rsa.result import Candidate, RoundRecord, RSAResult
from markov_rsa.rsa.tasks import CodeTask, MathTask, Task

__all__ = ["CANDIDATES_FILE", "PROBLEMS_FILE", "RUN_FILE", "SCHEDULE_FILE", "EvalSpec", "Evaluation", "Progress"]
#: With a total token budget: what the scheduler gave each problem (written when the run ends).
SCHEDULE_FILE = "schedule.json"


@dataclass(frozen=True)
class EvalSpec:
    task: str
    config: RSAConfig
    limit: int | None = None
    repeats: int = 1
    concurrency: int = 4
    #: How code is isolated: bubblewrap (refuses to run without it) or, opted into, rlimits only.
    isolation: Isolation = "bwrap"
    #: Resume a directory even if what ran there differs.
    force: bool = False
    #: The run's name in reports (default: the directory's name).
    name: str | None = None
    #: How the problems were selected (``data_dir``, ``release``, ``since``, ``until``), as given.
    data: Mapping[str, Any] = field(default_factory=dict)
    #: The command line that started the run (recorded, credentials removed).
    command: tuple[str, ...] = ()
    #: One budget of generated tokens across every problem, given round by round where populations agree
    #: least (:mod:`~markov_rsa.evals.schedule`).
    total_token_budget: int | None = None

    def identity(self, backend: Backend, problems: list[Problem]) -> dict[str, Any]:
        """What must match for a directory to be resumed: task, method, backend, prompts, version,
        isolation, the data (its selection and a checksum of every planned problem) and the plan."""
        info = backend.info
        version = self.config.prompt_version
        return {
            "task": self.task, "config": self.config.to_dict(), "repeats": self.repeats, "backend": info.kind,
            "model": info.model, "package_version": __version__,
            "prompts": {**{name: {"version": ps.version, "fingerprint": ps.fingerprint}
                           for name in ("math", "aime", "code") for ps in [prompt_set(name, version)]},
                        "code_problem": CODE_PROBLEM_VERSION},
            "isolation": self.isolation if any(p.kind == "code" for p in problems) else None,
            "data": {"release": self.data.get("release"), "since": self.data.get("since"),
                     "until": self.data.get("until"), "source": "local" if self.data.get("data_dir") else "hub",
                     "sha256": problems_digest(problems)},
            "plan": [p.id for p in problems],
        }


@dataclass
class Progress:
    """Counters a front end can render; updated in place by the runner."""

    total: int = 0
    done: int = 0
    skipped: int = 0
    correct: int = 0
    candidates: int = 0
    failed: list[str] = field(default_factory=list)
    #: Tokens generated so far, counting the streams still running (a long round visibly moves).
    tokens: int = 0
    streaming: dict[tuple[str, int], int] = field(default_factory=dict)
    #: Generations that failed after retries (their problems are retried on resume).
    failed_generations: int = 0
    started: float = field(default_factory=time.monotonic)


class PublicTests:
    """One problem's public-test scores, shared by grading and by selection, so that each program
    runs its public tests once however often either asks."""

    def __init__(self, code: CodeGrader, problem: Problem) -> None:
        self.code = code
        self.problem = problem
        self._outcomes: dict[str, asyncio.Future[tuple[bool, ...]]] = {}

    async def outcomes(self, program: str) -> tuple[bool, ...]:
        """Each public test's pass/fail (what consensus compares programs by)."""
        if program not in self._outcomes:
            self._outcomes[program] = asyncio.ensure_future(self._run_public(program))
        return await asyncio.shield(self._outcomes[program])

    async def _run_public(self, program: str) -> tuple[bool, ...]:
        p = self.problem
        return tuple([(await self.code.run_test(program, test, p.func_name))[0] for test in p.public_tests])

    async def score(self, program: str) -> int:
        return sum(await self.outcomes(program))

    async def grade(self, program: str | None) -> bool:
        """Correct when every public and private test passes (as CodeGrader.grade decides)."""
        p = self.problem
        if not program or not (p.public_tests or p.private_tests):
            return False
        if await self.score(program) < len(p.public_tests):
            return False
        return not p.private_tests or (await self.code.run_tests(program, p.private_tests, p.func_name)).all_passed


def engine_task(problem: Problem, public: PublicTests | None, prompt_version: str | None = None) -> Task:
    """The engine task for a problem, posed with its benchmark's prompt set."""
    prompts = prompt_set(benchmark(problem.task).prompts if problem.task in BENCHMARKS else
                         "code" if problem.kind == "code" else "math", prompt_version)
    if problem.kind == "code":
        return CodeTask(prompts=prompts, scorer=public.score if public else None,
                        outcomes=public.outcomes if public else None)
    return MathTask(prompts=prompts)


def problem_text(problem: Problem) -> str:
    return code_problem_text(problem.problem, problem.starter_code) if problem.kind == "code" else problem.problem


class Evaluation:
    """One evaluation run over a list of problems, writing into ``out``."""

    def __init__(self, spec: EvalSpec, backend: Backend, problems: list[Problem], out: Path,
                 *, math_grader: MathGrader | None = None, code_grader: CodeGrader | None = None) -> None:
        self.spec = spec
        self.backend = backend
        self.problems = problems[: spec.limit] if spec.limit else problems
        self.out = out
        kinds = {p.kind for p in self.problems}
        # Graders made here are closed when the run ends; ones passed in belong to the caller.
        self._owned: list[MathGrader] = []
        self.math = math_grader
        if self.math is None and "math" in kinds:
            self.math = MathGrader()
            self._owned.append(self.math)
        # Code grading refuses to start without real isolation, before any generation is paid for.
        self.code = code_grader or (CodeGrader(Sandbox(isolation=spec.isolation)) if "code" in kinds else None)
        self.progress = Progress()
        self._notify: Callable[[Progress], None] | None = None
        self.seed_drawn = False
        self.scheduler: RoundScheduler | None = None
        self._slots: asyncio.Semaphore | None = None

    def _prepare(self) -> set[tuple[str, int]]:
        """Check or write ``run.json``; returns the (problem, repeat)s already complete."""
        previous = read_meta(self.out)
        if self.spec.config.seed is None:  # draw one (or reuse the one drawn before) so the run can be repeated
            recorded = (previous or {}).get("config", {}).get("seed") if previous else None
            seed = recorded if isinstance(recorded, int) else secrets.randbelow(2**31)
            self.spec = dataclasses.replace(self.spec, config=self.spec.config.replace(seed=seed))
            self.seed_drawn = True
        identity = self.spec.identity(self.backend, self.problems)
        if previous is not None:
            check_resumable(self.out, previous, identity, force=self.spec.force)
            updated = dict(previous)
            if self.spec.name:  # a new name is a new label, nothing more
                updated["name"] = self.spec.name
            if self.spec.force:  # resumed anyway: reports divide by the plan that now runs
                updated["plan"] = identity["plan"]
            if updated != previous:
                write_atomic(self.out / RUN_FILE, json.dumps(updated, indent=2))
        else:
            info = self.backend.info
            write_atomic(self.out / RUN_FILE, json.dumps({
                "format": FORMAT_VERSION, **identity, "name": self.spec.name or self.out.resolve().name,
                "device": info.device,
                # The Hub commit each set was read at (none for local --data-dir copies).
                "data_revisions": sorted({str(p.meta["revision"]) for p in self.problems if p.meta.get("revision")}),
                "seed_drawn": self.seed_drawn,
                "provenance": provenance(self.spec.command, info, self.problems, self.spec.data),
                "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }, indent=2))
        return {(r.problem_id, r.repeat) for r in read_problems(self.out / PROBLEMS_FILE) if r.complete}

    async def run(self, on_update: Callable[[Progress], None] | None = None) -> Progress:
        """Run (or resume) the evaluation; only one process may write the directory at a time."""
        try:
            with locked(self.out):
                return await self._run(on_update)
        finally:
            for grader in self._owned:
                grader.close()

    async def _run(self, on_update: Callable[[Progress], None] | None) -> Progress:
        done = self._prepare()
        jobs = [(p, r) for p in self.problems for r in range(self.spec.repeats) if (p.id, r) not in done]
        self.progress = Progress(total=len(self.problems) * self.spec.repeats,
                                 skipped=len(self.problems) * self.spec.repeats - len(jobs))
        candidates, problems = JsonlWriter(self.out / CANDIDATES_FILE), JsonlWriter(self.out / PROBLEMS_FILE)
        semaphore = self._slots = asyncio.Semaphore(self.spec.concurrency)
        notify = on_update or (lambda progress: None)
        self._notify = notify
        if self.spec.total_token_budget is not None:
            before = sum(r.completion_tokens for r in read_problems(self.out / PROBLEMS_FILE))
            self.scheduler = RoundScheduler(self.spec.total_token_budget, len(jobs), spent_before=before)

        async def one(problem: Problem, repeat: int) -> None:
            tokens: int | None = None
            async with semaphore:
                try:
                    record = await self._solve(problem, repeat, candidates)
                    tokens = record.completion_tokens
                except (BackendRequestError, ConfigError):
                    raise  # a wrong key, model or URL, or an --out that cannot be written: stop the run
                except Exception as exc:  # one problem's failure is recorded (it scores wrong), the others go on
                    self.progress.failed.append(f"{problem.id}#{repeat}: {exc}")
                    problems.write(ProblemRecord(attempt=uuid.uuid4().hex, problem_id=problem.id, repeat=repeat,
                                                 task=problem.task, correct=False, gold=problem.answer,
                                                 error=f"{type(exc).__name__}: {str(exc)[:300]}"))
                    notify(self.progress)
                    return
                finally:
                    if self.scheduler is not None:
                        self.scheduler.finished((problem.id, repeat), tokens)
                problems.write(record)
                self.progress.done += 1
                self.progress.correct += int(record.correct)
                self.progress.failed_generations += record.failed_generations
                notify(self.progress)

        tasks = [asyncio.ensure_future(one(p, r)) for p, r in jobs]
        try:
            notify(self.progress)
            await asyncio.gather(*tasks)
        finally:
            for pending in tasks:  # one that stops the run (or an interrupt) stops the others before files close
                pending.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            candidates.close()
            problems.close()
            if self.scheduler is not None:
                (self.out / SCHEDULE_FILE).write_text(json.dumps(self.scheduler.summary(), indent=2), encoding="utf-8")
        return self.progress

    def _gate(self, problem: Problem, repeat: int, task: Task) -> StageGate | None:
        """With a total token budget: ask the scheduler for each stage after round 0, giving up this
        problem's slot while it waits (the waves need every unfinished problem to reach its gate)."""
        scheduler, slots, config = self.scheduler, self._slots, self.spec.config
        if scheduler is None or slots is None:
            return None
        order = next(i for i, p in enumerate(self.problems) if p.id == problem.id) * self.spec.repeats + repeat

        async def gate(stage: int, last: RoundRecord) -> bool:
            agreement = await round_agreement(task, last.candidates)
            slots.release()
            try:
                requests = config.final_n if stage > config.rounds else config.population
                longest = max((c.usage.generated_tokens for c in last.candidates), default=0)
                return await scheduler.ask((problem.id, repeat), order, agreement, last.usage.generated_tokens,
                                           longest * requests)
            finally:
                await slots.acquire()

        return gate

    def _seed(self, problem: Problem, repeat: int) -> int | None:
        base = self.spec.config.seed
        return None if base is None else derive_seed(base, zlib.crc32(problem.id.encode()), repeat)

    async def _grade(self, candidate: Candidate, problem: Problem, public: PublicTests | None) -> bool:
        if public is not None:
            return await public.grade(candidate.answer)
        assert self.math is not None
        return await self.math.grade_problem(candidate.answer, problem)

    async def _solve(self, problem: Problem, repeat: int, log: JsonlWriter) -> ProblemRecord:
        attempt = uuid.uuid4().hex
        config = self.spec.config.replace(seed=self._seed(problem, repeat))
        public = PublicTests(self.code, problem) if problem.kind == "code" and self.code else None
        task = engine_task(problem, public, config.prompt_version)
        engine = MarkovianRSA(self.backend, config, task=task)
        graded: dict[tuple[int, int], bool] = {}
        pending: list[asyncio.Task[None]] = []
        result: RSAResult | None = None
        started = time.perf_counter()

        async def grade_and_log(candidate: Candidate) -> None:
            correct = await self._grade(candidate, problem, public) if candidate.ok else False
            graded[(candidate.round, candidate.index)] = correct
            self.progress.candidates += 1
            log.write(CandidateRecord(
                attempt=attempt, problem_id=problem.id, repeat=repeat, round=candidate.round, index=candidate.index,
                parents=candidate.parents, answer=candidate.answer, correct=correct,
                finish_reason=candidate.finish_reason, tail=candidate.tail, tail_tokens=candidate.tail_tokens,
                completion_tokens=candidate.usage.completion_tokens, prompt_tokens=candidate.usage.prompt_tokens,
                seconds=round(candidate.seconds, 3), error=candidate.error, text=candidate.text,
                reasoning=candidate.reasoning if candidate.reasoning != candidate.text else "",
                tool_calls=candidate.tool_calls,
            ))

        key = (problem.id, repeat)
        gate = self._gate(problem, repeat, task)
        try:
            async with contextlib.aclosing(engine.stream(problem_text(problem), gate=gate)) as events:
                async for event in events:
                    if isinstance(event, CandidateFinished):
                        self.progress.tokens += event.candidate.usage.generated_tokens
                        pending.append(asyncio.create_task(grade_and_log(event.candidate)))
                    elif isinstance(event, RoundProgress):
                        self.progress.streaming[key] = event.tokens
                        if self._notify is not None:
                            self._notify(self.progress)
                    elif isinstance(event, RoundStarted):
                        self.progress.streaming.pop(key, None)
                    elif isinstance(event, RunFinished):
                        result = event.result
            outcomes = await asyncio.gather(*pending, return_exceptions=True)
        finally:  # stopped part-way (another problem could not write, an interrupt): no task is left behind
            self.progress.streaming.pop(key, None)
            for job in pending:
                job.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        failure = next((o for o in outcomes if isinstance(o, BaseException)), None)
        if failure is not None:
            raise failure
        assert result is not None
        stages = [await self._round_score(r, graded, task) for r in result.rounds]
        scores = [score for score, _ in stages]
        # Each round's agreement as early exit measures it: what a what-if over this run replays.
        agreements = [await round_agreement(task, r.candidates) if r.kind != "final" else None
                      for r in result.rounds]
        dicts = [{**s.to_dict(), "agreement": g} for s, g in zip(scores, agreements, strict=True)]
        position = scored_stage(dicts, result.stop_reason, config.token_budget)
        answer = result.answer
        last = max((i for i, s in enumerate(scores) if s.kind != "final"), default=None)
        if result.stop_reason == "complete" and position == last:
            chosen = graded.get(result.selected, False) if result.selected else False
        elif position is None:  # no stage fit the limit: nothing is scored, and the report says so
            chosen, answer = False, None
        else:  # a limit decided the stage: its majority answers, by rule (see scored_stage)
            chosen, winner = scores[position].majority, stages[position][1]
            answer = winner.answer if winner is not None else None
        population = scores[position] if position is not None else None
        return ProblemRecord(
            attempt=attempt, problem_id=problem.id, repeat=repeat, task=problem.task, correct=chosen,
            rounds=dicts, population=population.to_dict() if population else {},
            answer=answer if problem.kind == "math" else None, gold=problem.answer,
            completion_tokens=result.usage.completion_tokens, prompt_tokens=result.usage.prompt_tokens,
            seconds=round(time.perf_counter() - started, 3), seed=result.seed, stop_reason=result.stop_reason,
            selection=result.selection, failed_generations=sum(s.failed for s in scores),
            generated_tokens=result.usage.generated_tokens,
            scored_round=population.round if population else None,
        )

    @staticmethod
    async def _round_score(stage: RoundRecord, graded: dict[tuple[int, int], bool],
                           task: Task) -> tuple[RoundScore, Candidate | None]:
        """Scores of one stage, and the candidate its majority chose; "majority" uses the task's own
        selection rule (for code: the program passing most public tests) over the generations that ran."""
        cands = stage.candidates
        correct = [graded.get((c.round, c.index), False) for c in cands]
        ran = [i for i, c in enumerate(cands) if c.ok]
        picked, _ = await task.select([cands[i] for i in ran]) if ran else (None, 0)
        winner = ran[picked] if picked is not None else None
        tokens = sum(c.usage.completion_tokens for c in cands)
        score = round_score(stage.index, stage.kind, correct, winner, tokens, failed=len(cands) - len(ran),
                            complete=stage.complete, generated_tokens=stage.usage.generated_tokens,
                            prompt_tokens=stage.usage.prompt_tokens)
        return score, cands[winner] if winner is not None else None
