"""The terminal side of ``rsa eval``: a progress bar over the runner, then a summary table."""

from __future__ import annotations

import asyncio
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from markov_rsa.backends.base import Backend
from markov_rsa.evals.datasets import Problem
from markov_rsa.evals.grading.sandbox import Isolation
from markov_rsa.evals.report import load_run, results_table
from markov_rsa.evals.runner import EvalSpec, Evaluation
from markov_rsa.evals.runner import Progress as RunProgress
from markov_rsa.rsa.config import RSAConfig


def run_evaluation(task: str, config: RSAConfig, backend: Backend, problems: list[Problem], out: Path, *,
                   limit: int | None, repeats: int, concurrency: int, isolation: Isolation = "bwrap",
                   force: bool = False, name: str | None = None, total_token_budget: int | None = None) -> int:
    """Run (or resume) an evaluation; returns the exit code (1 if some problems failed)."""
    console = Console(stderr=True)
    spec = EvalSpec(task=task, config=config, limit=limit, repeats=repeats, concurrency=concurrency,
                    isolation=isolation, force=force, name=name, total_token_budget=total_token_budget)
    if isolation != "bwrap" and any(p.kind == "code" for p in problems):
        console.print("[bold yellow]warning:[/] --unsafe-no-sandbox: untrusted programs run with rlimits only and "
                      "can escape (read files, use the network, leave processes behind)", highlight=False)
    evaluation = Evaluation(spec, backend, problems, out)
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[status]}"), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as bar:
        handle = bar.add_task(task, total=None, status="")

        def update(p: RunProgress) -> None:
            finished = p.done + p.skipped
            tokens = p.tokens + sum(p.streaming.values())
            status = f"{p.correct}/{p.done} correct, {p.candidates} candidates, {tokens:,} tokens"
            if p.skipped:
                status += f", {p.skipped} resumed"
            if p.failed:
                status += f", {len(p.failed)} failed"
            bar.update(handle, total=p.total, completed=finished, status=status)

        async def go() -> RunProgress:
            try:
                return await evaluation.run(update)
            finally:
                await backend.aclose()

        progress = asyncio.run(go())
    for failure in progress.failed:
        console.print(f"[red]failed[/] {failure}", highlight=False, soft_wrap=True)
    if evaluation.scheduler is not None:
        spend = evaluation.scheduler.summary()
        stopped = sum(p["stopped_by_budget"] for p in spend["problems"].values())
        console.print(f"total token budget: spent {spend['spent']:,} of {spend['total_token_budget']:,} in "
                      f"{spend['waves']} waves; {stopped} problem runs stopped by the budget (their last round "
                      f"voted); per problem in {out / 'schedule.json'}", highlight=False, soft_wrap=True)
    rows = results_table([load_run(out)])
    for header, value in zip(rows[0], rows[1], strict=True):
        console.print(f"{header:>16}: {value}", highlight=False)
    return 1 if progress.failed else 0
