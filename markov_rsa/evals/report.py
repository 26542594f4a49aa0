"""Reports from run directories: a Markdown file, a self-contained HTML file and PNG plots.

Several runs side by side compare methods (e.g. one rollout against Markovian RSA) on the same
task: one table row and one plot line per run.
"""

from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from markov_rsa.errors import ConfigError
from markov_rsa.evals.log import PROBLEMS_FILE, RUN_FILE, read_problems
from markov_rsa.evals.metrics import Summary, summarise

MATH_CREDIT = ("Math problem sets as published by MathArena (matharena.ai); problem statements belong to MAA (AIME) "
               "and HMMT.")


@dataclass(frozen=True)
class RunData:
    path: Path
    label: str
    task: str
    config: dict[str, Any]
    backend: dict[str, Any]
    summary: Summary


def method_label(config: dict[str, Any]) -> str:
    core = f"N{config['population']} K{config['k']} T{config['rounds']} β{config['budget']} τ{config['tail']}"
    if config.get("chunk_size"):
        core += f" C{config['chunk_size']}"
    return f"{config['preset']} ({core})" if config.get("preset") else core


def load_run(path: Path) -> RunData:
    run_file = path / RUN_FILE
    if not run_file.is_file():
        raise ConfigError("run", f"{path} is not a run directory (no {RUN_FILE}); give the --out of rsa eval")
    meta = json.loads(run_file.read_text(encoding="utf-8"))
    records = read_problems(path / PROBLEMS_FILE)
    backend = meta.get("backend", {})
    if not isinstance(backend, dict):  # format 2 records kind and model side by side
        backend = {"kind": backend, "model": meta.get("model"), "device": meta.get("device")}
    return RunData(path, method_label(meta["config"]), meta["task"], meta["config"], backend,
                   summarise(records))


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def results_table(runs: list[RunData]) -> list[list[str]]:
    header = ["task", "method", "model", "problems", "avg@N", "maj@N", "pass@N", "final", "tokens/problem",
              "s/problem"]
    rows = [header]
    for run in runs:
        s = run.summary
        rows.append([run.task, run.label, str(run.backend.get("model", "")), str(s.problems), _pct(s.avg_at_n),
                     _pct(s.majority), _pct(s.pass_at_n), _pct(s.final), f"{s.tokens_per_problem:,.0f}",
                     f"{s.seconds_per_problem:.1f}"])
    return rows


def rounds_table(runs: list[RunData]) -> list[list[str]]:
    rows = [["task", "method", "round", "avg@N", "maj@N", "pass@N", "cumulative tokens/problem"]]
    for run in runs:
        for index, kind, avg, maj, pass_n, tokens in run.summary.rounds:
            name = "final" if kind == "final" else str(index)
            rows.append([run.task, run.label, name, _pct(avg), _pct(maj), _pct(pass_n), f"{tokens:,.0f}"])
    return rows


def _markdown(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows[1:]]
    return "\n".join(lines)


def _html_table(rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows[1:])
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _plots(runs: list[RunData]) -> dict[str, bytes]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures: dict[str, bytes] = {}
    for name, x_of, xlabel in (
        ("accuracy_per_round", lambda r: r[0], "round (0 = independent rollouts)"),
        ("accuracy_vs_tokens", lambda r: r[5], "generated tokens per problem (cumulative)"),
    ):
        fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
        for run in runs:
            stages = [r for r in run.summary.rounds if r[1] != "final"]
            ax.plot([x_of(r) for r in stages], [100 * r[2] for r in stages], marker="o",
                    label=f"{run.task}: {run.label}")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("avg@N accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        if name == "accuracy_per_round":
            from matplotlib.ticker import MaxNLocator

            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png")
        plt.close(fig)
        figures[name] = buffer.getvalue()
    return figures


def write_report(run_dirs: list[Path], out: Path) -> tuple[Path, Path]:
    """Write ``report.md``, ``report.html`` and the plots into ``out``; returns the two report paths."""
    if not run_dirs:
        raise ConfigError("runs", "give at least one run directory")
    runs = [load_run(Path(p)) for p in run_dirs]
    out.mkdir(parents=True, exist_ok=True)
    plots = _plots(runs)
    for name, png in plots.items():
        (out / f"{name}.png").write_bytes(png)
    table, per_round = results_table(runs), rounds_table(runs)
    credit = MATH_CREDIT if any(not r.task.startswith("lcb") for r in runs) else ""
    md = "\n\n".join([
        "# Markovian RSA results",
        "avg@N: mean accuracy of the final population; maj@N: its majority vote; pass@N: any candidate "
        "correct; final: the answer the run returned.",
        _markdown(table), "## Accuracy by round", _markdown(per_round),
        *(f"![{name}]({name}.png)" for name in plots), credit,
    ]).strip() + "\n"
    md_path = out / "report.md"
    md_path.write_text(md, encoding="utf-8")
    images = "".join(
        f'<figure><img alt="{name}" src="data:image/png;base64,{base64.b64encode(png).decode()}"></figure>'
        for name, png in plots.items()
    )
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>Markovian RSA results</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;max-width:70em}}table{{border-collapse:collapse;margin:1em 0}}
th,td{{border:1px solid #ccc;padding:.3em .6em;text-align:right}}th{{background:#f3f3f3}}
td:nth-child(-n+3){{text-align:left}}figure{{display:inline-block;margin:.5em}}</style></head><body>
<h1>Markovian RSA results</h1><p>avg@N: mean accuracy of the final population; maj@N: its majority vote; pass@N: any
candidate correct; final: the answer the run returned.</p>{_html_table(table)}<h2>Accuracy by round</h2>
{_html_table(per_round)}{images}<p><small>{html.escape(credit)}</small></p></body></html>"""
    html_path = out / "report.html"
    html_path.write_text(page, encoding="utf-8")
    return md_path, html_path
