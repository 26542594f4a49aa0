"""``rsa show RUN [PROBLEM]``: a run's problems, or one problem's population round by round."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from markov_rsa.errors import ConfigError
from markov_rsa.evals.log import CANDIDATES_FILE, PROBLEMS_FILE, read_candidates, read_problems
from markov_rsa.evals.report import load_run, natural_key
from markov_rsa.rsa.answers import normalize_answer


def _short(text: str | None, width: int) -> str:
    if text is None:
        return "—"
    flat = " ".join(text.split())
    return escape(flat if len(flat) <= width else "…" + flat[-(width - 1):])  # model text, never markup


def show_run(path: Path, problem: str | None, console: Console) -> None:
    run = load_run(path)
    records = read_problems(path / PROBLEMS_FILE)
    if problem is None:
        table = Table(title=f"{run.name}: {run.task}, {run.label}", title_justify="left")
        for column in ("problem", "repeat", "gold", "answer", "final", "population", "tokens"):
            table.add_column(column, justify="left" if column in ("problem", "answer", "gold") else "right")
        for r in sorted(records, key=lambda r: (natural_key(r.problem_id), r.repeat)):
            outcome = "failed" if r.error else ("✓" if r.correct else "✗")
            if r.failed_generations:
                outcome += f" ({r.failed_generations} gens failed)"
            table.add_row(r.problem_id, str(r.repeat), _short(r.gold, 16), _short(r.answer, 20), outcome,
                          f"{100 * float(r.population.get('avg', 0)):.0f}%",
                          f"{r.generated_tokens or r.completion_tokens:,}")
        console.print(table)
        return
    chosen = [r for r in records if r.problem_id == problem]
    if not chosen:
        known = ", ".join(sorted({r.problem_id for r in records})[:10])
        raise ConfigError("problem", f"{problem!r} is not in {path}; problems include {known}")
    candidates = read_candidates(path / CANDIDATES_FILE, {r.attempt for r in chosen})
    for record in chosen:
        console.print(f"[bold]{escape(problem)}[/] repeat {record.repeat}: gold {escape(repr(record.gold))}, "
                      f"answer {escape(repr(record.answer))} "
                      f"({'correct' if record.correct else 'wrong'}; {record.selection}, {record.stop_reason})",
                      highlight=False)
        mine = [c for c in candidates if c.attempt == record.attempt]
        for index in sorted({c.round for c in mine}):
            stage = sorted((c for c in mine if c.round == index), key=lambda c: c.index)
            votes = Counter(normalize_answer(c.answer) for c in stage if c.answer is not None)
            agree = votes.most_common(1)[0][1] / len(stage) if votes else 0.0
            table = Table(title=f"round {index}: {sum(c.correct for c in stage)}/{len(stage)} correct, "
                                f"{agree:.0%} agree", title_justify="left")
            for column in ("#", "parents", "answer", "ok", "tokens", "finish", "tail carried"):
                table.add_column(column, overflow="fold")
            for c in stage:
                table.add_row(str(c.index), ",".join(map(str, c.parents)) or "–", _short(c.answer, 18),
                              "✓" if c.correct else "✗", f"{c.completion_tokens:,}", c.finish_reason,
                              _short(c.tail, 60))
            console.print(table)
