"""The terminal side of ``rsa eval``: a progress bar over the runner, then a summary table."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from markov_rsa.backends.base import Backend
from markov_rsa.evals.datasets import Problem
from markov_rsa.evals.grading.sandbox import Isolation
from markov_rsa.evals.report import load_run, results_table
from markov_rsa.evals.runner import EvalSpec, Evaluation
from markov_rsa.evals.runner import Progress as RunProgress
from markov_rsa.rsa.config import RSAConfig


def status_text(p: RunProgress) -> str:
    tokens = p.tokens + sum(p.streaming.values())
    status = f"{p.correct}/{p.done} right, {_short(tokens)} tok"
    if p.skipped:
        status += f", {p.skipped} resumed"
    if p.failed:
        status += f", {len(p.failed)} failed"
    if p.failed_generations:
        status += f", {p.failed_generations} gens failed"
    return status


def _short(n: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return f"{n:.0f}"


class PlainProgress:
    """Progress as plain lines every ``every`` seconds, for logs where no bar can redraw (nohup, a
    cluster's job log): done/total, rate, time left, and the status."""

    def __init__(self, console: Console, task: str, every: float) -> None:
        self.console, self.task, self.every = console, task, every
        self.last = time.monotonic()

    def maybe_print(self, p: RunProgress) -> None:
        if time.monotonic() - self.last >= self.every:
            self.print(p)

    def print(self, p: RunProgress) -> None:
        self.last = time.monotonic()
        elapsed = max(time.monotonic() - p.started, 1e-9)
        rate = p.done / elapsed * 60
        left = p.total - p.done - p.skipped
        eta = f"{left / (p.done / elapsed) / 60:.1f} min left" if p.done else "time left unknown"
        self.console.print(f"{self.task}: {p.done + p.skipped}/{p.total} done, {rate:.1f} problems/min, {eta}; "
                           f"{status_text(p)}", highlight=False, soft_wrap=True)


def run_evaluation(task: str, config: RSAConfig, backend: Backend, problems: list[Problem], out: Path, *,
                   limit: int | None, repeats: int, concurrency: int, isolation: Isolation = "bwrap",
                   force: bool = False, name: str | None = None, data: Mapping[str, Any] | None = None,
                   command: tuple[str, ...] = (), progress_every: float = 30.0,
                   total_token_budget: int | None = None) -> int:
    """Run (or resume) an evaluation; returns the exit code (1 if some problems failed)."""
    console = Console(stderr=True)
    spec = EvalSpec(task=task, config=config, limit=limit, repeats=repeats, concurrency=concurrency,
                    isolation=isolation, force=force, name=name, data=dict(data or {}), command=command,
                    total_token_budget=total_token_budget)
    if isolation != "bwrap" and any(p.kind == "code" for p in problems):
        console.print("[bold yellow]warning:[/] --unsafe-no-sandbox: untrusted programs run with rlimits only and "
                      "can escape (read files, use the network, leave processes behind)", highlight=False)
    evaluation = Evaluation(spec, backend, problems, out)
    lines = PlainProgress(console, task, progress_every) if not console.is_terminal else None
    # Fits 60 columns: the bar shrinks, the status is short, the time left follows the rate so far.
    columns = (TextColumn("[bold]{task.description}"), BarColumn(bar_width=12), MofNCompleteColumn(),
               TextColumn("{task.fields[status]}"), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=False, disable=lines is not None) as bar:
        handle = bar.add_task(task, total=None, status="")

        def update(p: RunProgress) -> None:
            bar.update(handle, total=p.total, completed=p.done + p.skipped, status=status_text(p))
            if lines is not None:
                lines.maybe_print(p)

        async def go() -> RunProgress:
            try:
                return await evaluation.run(update)
            finally:
                await backend.aclose()

        progress = asyncio.run(go())
    if lines is not None:
        lines.print(progress)
    for failure in progress.failed:
        console.print(f"[red]failed[/] {escape(str(failure))}", highlight=False, soft_wrap=True)
    if evaluation.scheduler is not None:
        spend = evaluation.scheduler.summary()
        stopped = sum(p["stopped_by_budget"] for p in spend["problems"].values())
        console.print(f"total token budget: spent {spend['spent']:,} of {spend['total_token_budget']:,} in "
                      f"{spend['waves']} waves; {stopped} problem runs stopped by the budget (their last round "
                      f"voted); per problem in {out / 'schedule.json'}", highlight=False, soft_wrap=True)
    rows = results_table([load_run(out)])
    for header, value in zip(rows[0], rows[1], strict=True):
        console.print(f"{header:>16}: {value}", highlight=False, markup=False)
    return 1 if progress.failed else 0
