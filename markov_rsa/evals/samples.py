"""Per-sample rows of a run, for analysis outside the report: CSV, Parquet, a pandas DataFrame, HTML.

One row per candidate of every finished (problem, repeat): the problem, the round and the
candidate's place in it, its answer and grade, its tokens and time, how it ended, and the
problem-level outcome (the gold answer, the returned answer and whether it was right). Rows come in
natural problem order (II_2 before II_10), then repeat, round and index. The columns are
:data:`COLUMNS`; :func:`samples_df` is the pandas loader (extra ``analysis``).
"""

from __future__ import annotations

import csv
import html
from pathlib import Path
from typing import Any

from markov_rsa.errors import ConfigError, MissingDependencyError
from markov_rsa.evals.log import CANDIDATES_FILE, PROBLEMS_FILE, read_candidates, read_problems
from markov_rsa.evals.report import load_run, natural_key

COLUMNS = ("run", "task", "problem_id", "repeat", "round", "index", "parents", "answer", "correct",
           "finish_reason", "error", "completion_tokens", "prompt_tokens", "seconds", "gold", "returned_answer",
           "returned_correct", "stop_reason", "scored_round", "text", "reasoning")


def sample_rows(run_dir: Path, *, texts: bool = True) -> list[dict[str, Any]]:
    """Every candidate of the run's finished problems, as flat rows (``texts=False`` leaves out the full
    text and reasoning, which can be large)."""
    run = load_run(run_dir)
    records = {r.attempt: r for r in read_problems(run_dir / PROBLEMS_FILE) if r.error is None}
    rows = []
    for c in read_candidates(run_dir / CANDIDATES_FILE, set(records)):
        p = records[c.attempt]
        rows.append({
            "run": run.name, "task": run.task, "problem_id": c.problem_id, "repeat": c.repeat, "round": c.round,
            "index": c.index, "parents": " ".join(map(str, c.parents)), "answer": c.answer, "correct": c.correct,
            "finish_reason": c.finish_reason, "error": c.error, "completion_tokens": c.completion_tokens,
            "prompt_tokens": c.prompt_tokens, "seconds": c.seconds, "gold": p.gold, "returned_answer": p.answer,
            "returned_correct": p.correct, "stop_reason": p.stop_reason, "scored_round": p.scored_round,
            "text": c.text if texts else None, "reasoning": c.reasoning if texts else None,
        })
    rows.sort(key=lambda r: (natural_key(str(r["problem_id"])), r["repeat"], r["round"], r["index"]))
    return rows


def samples_df(run_dir: str | Path, *, texts: bool = True) -> Any:
    """The run's samples as a pandas DataFrame (one row per candidate; columns :data:`COLUMNS`)."""
    try:
        import pandas as pd
    except ImportError:
        raise MissingDependencyError("samples_df needs pandas: pip install 'markov-rsa[analysis]'") from None
    return pd.DataFrame(sample_rows(Path(run_dir), texts=texts), columns=list(COLUMNS))


def export_samples(run_dir: Path, out: Path, *, texts: bool = True) -> int:
    """Write the samples to ``out`` (``.csv`` or ``.parquet``); returns the number of rows."""
    rows = sample_rows(run_dir, texts=texts)
    suffix = out.suffix.lower()
    if suffix == ".csv":
        with out.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(COLUMNS))
            writer.writeheader()
            writer.writerows(rows)
    elif suffix == ".parquet":
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            raise MissingDependencyError("Parquet export needs pyarrow: pip install 'markov-rsa[hub]'") from None
        pq.write_table(pa.Table.from_pylist(rows), out)
    else:
        raise ConfigError("out", f"{out}: give a .csv or .parquet file name")
    return len(rows)


def samples_html(run_dir: Path) -> str:
    """A self-contained page: each problem, its returned answer and, round by round, every candidate
    (answer, grade, tokens, how it ended, its parents) with its full text folded away."""
    run = load_run(run_dir)
    rows = sample_rows(run_dir)
    problems: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for row in rows:
        problems.setdefault((row["problem_id"], row["repeat"]), []).append(row)
    parts = []
    for (pid, repeat), items in problems.items():
        head = items[0]
        mark = "✓" if head["returned_correct"] else "✗"
        parts.append(f'<section id="{html.escape(pid)}-{repeat}"><h2>{html.escape(pid)} (repeat {repeat}) {mark}</h2>'
                     f"<p>gold <code>{html.escape(str(head['gold']))}</code>, returned "
                     f"<code>{html.escape(str(head['returned_answer']))}</code>; {html.escape(head['stop_reason'])}"
                     f"{'' if head['scored_round'] is None else ', scored on round ' + str(head['scored_round'])}</p>")
        for number in sorted({r["round"] for r in items}):
            stage = [r for r in items if r["round"] == number]
            right = sum(1 for r in stage if r["correct"])
            cells = "".join(
                f"<tr><td>{r['index']}</td><td>{html.escape(r['parents']) or '–'}</td>"
                f"<td><code>{html.escape(str(r['answer']))}</code></td><td>{'✓' if r['correct'] else '✗'}</td>"
                f"<td>{r['completion_tokens']:,}</td><td>{html.escape(r['finish_reason'])}"
                f"{' — ' + html.escape(str(r['error'])) if r['error'] else ''}</td>"
                f"<td><details><summary>text</summary><pre>{html.escape(r['text'] or '')}</pre>"
                f"{'<pre>' + html.escape(r['reasoning']) + '</pre>' if r['reasoning'] else ''}</details></td></tr>"
                for r in stage)
            parts.append(f"<h3>round {number}: {right}/{len(stage)} correct</h3><table><thead><tr><th>#</th>"
                         "<th>parents</th><th>answer</th><th>ok</th><th>tokens</th><th>finish</th><th>candidate</th>"
                         f"</tr></thead><tbody>{cells}</tbody></table>")
        parts.append("</section>")
    index = " ".join(f'<a href="#{html.escape(pid)}-{rep}">{html.escape(pid)}#{rep}</a>' for pid, rep in problems)
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(run.name)}: samples</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>body{{font-family:system-ui,sans-serif;margin:2em auto;max-width:72em;padding:0 1em}}
table{{border-collapse:collapse;margin:.5em 0;width:100%;font-size:.85em}}th,td{{border:1px solid #ccc;
padding:.2em .4em;text-align:left;vertical-align:top;overflow-wrap:normal}}pre{{white-space:pre-wrap;
max-height:30em;overflow:auto}}</style></head><body><h1>{html.escape(run.name)}: {html.escape(run.task)},
{html.escape(run.label)}</h1><p>{index}</p>{''.join(parts)}</body></html>"""
