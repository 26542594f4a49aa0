"""Terminal rendering of engine events and results (stderr), kept out of the engine itself."""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from markov_rsa.rsa.answers import normalize_answer
from markov_rsa.rsa.events import (
    CandidateFinished,
    ConsensusReached,
    Event,
    RoundFinished,
    RoundProgress,
    RoundStarted,
    RunFinished,
)
from markov_rsa.rsa.result import RSAResult


async def follow(events: AsyncIterator[Event], console: Console, *, quiet: bool = False) -> RSAResult:
    """Show a live status line while the run goes, and return its result."""
    result: RSAResult | None = None
    done = total = 0
    label = ""
    with console.status("starting", spinner="dots") as status:
        async for event in events:
            if isinstance(event, RoundStarted):
                done, total = 0, event.requests
                label = "final aggregation" if event.round_kind == "final" else f"round {event.round}"
                status.update(f"{label}: 0/{total} candidates")
            elif isinstance(event, CandidateFinished):
                done += 1
                status.update(f"{label}: {done}/{total} candidates")
            elif isinstance(event, RoundProgress):  # streamed counts: a long round visibly moves
                status.update(f"{label}: {event.finished}/{total} candidates, {event.tokens:,} tokens so far")
            elif isinstance(event, RoundFinished) and not quiet:
                console.print(
                    f"{label}: majority {escape(repr(event.majority))} ({event.agreement:.0%} agree), "
                    f"{event.usage.completion_tokens} tokens, {event.seconds:.1f}s"
                    + (f", {event.failed} failed" if event.failed else "")
                )
            elif isinstance(event, ConsensusReached) and not quiet:
                console.print(f"round {event.round}: {event.agreement:.0%} agree (early exit at "
                              f"{event.threshold:.0%}): stopping, round {event.round} votes", highlight=False)
            elif isinstance(event, RunFinished):
                result = event.result
    assert result is not None
    return result


def _answers_cell(answers: list[str | None], width: int = 48) -> Text:
    counts = Counter((normalize_answer(a) or '""') if a is not None else "—" for a in answers)
    text = "  ".join(f"{a}×{n}" if n > 1 else a for a, n in counts.most_common())
    return Text(text if len(text) <= width else text[: width - 1] + "…")  # model text, never markup


def round_table(result: RSAResult) -> Table:
    table = Table(title=f"Markovian RSA ({result.config.preset or 'custom'}, seed {result.seed})", title_justify="left")
    for column, justify in (("round", "right"), ("answers", "left"), ("agree", "right"),
                            ("tokens", "right"), ("time", "right")):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for record in result.rounds:
        answers = record.answers
        counts = Counter(normalize_answer(a) for a in answers if a is not None)
        agree = counts.most_common(1)[0][1] / len(answers) if counts and answers else 0.0
        name = "final" if record.kind == "final" else str(record.index)
        if result.consensus is not None and result.consensus["round"] == record.index:
            name += " (consensus)"
        table.add_row(name, _answers_cell(answers), f"{agree:.0%}", str(record.usage.completion_tokens),
                      f"{record.seconds:.1f}s")
    return table


def summary_line(result: RSAResult) -> str:
    stop = "" if result.stop_reason == "complete" else f" (stopped early: {result.stop_reason})"
    if result.consensus is not None:
        c = result.consensus
        stop = (f" (stopped early: consensus, {c['agreement']:.0%} agree at round {c['round']} >= "
                f"{c['threshold']:.0%})")
    approx = ", tails approximate" if result.tails_approximate else ""
    return (f"{result.usage.requests} generations, {result.usage.completion_tokens} generated tokens, "
            f"{result.seconds:.1f}s{approx}{stop}")
