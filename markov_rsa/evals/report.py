"""Reports from run directories: Markdown, a self-contained HTML page, PNG plots and ``report.json``.

Several runs side by side compare methods (e.g. one rollout against Markovian RSA) on the same
task: one row, one plot line and one per-problem column per run, each under the run's name. Every
accuracy carries a 95% interval over problems (:mod:`~markov_rsa.evals.intervals`), published
figures for the same task are shown beside the runs and marked as published, and ``report.json``
holds every figure of the Markdown for scripts.
"""

from __future__ import annotations

import base64
import functools
import html
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from markov_rsa.errors import ConfigError
from markov_rsa.evals.intervals import interval
from markov_rsa.evals.log import PROBLEMS_FILE, RUN_FILE, ProblemRecord, read_meta, read_problems
from markov_rsa.evals.metrics import Summary, mean, per_problem, per_problem_round, summarise
from markov_rsa.evals.published import Published, published_for
from markov_rsa.evals.whatif import WhatIf, fill_agreement, what_if

MATH_CREDIT = ("Math problem sets as published by MathArena (matharena.ai); problem statements belong to MAA (AIME) "
               "and HMMT.")
#: The accuracies of a run: key in report.json, column header, per-problem metric.
METRICS = (("avg_at_n", "avg@N", "avg"), ("majority", "maj@N", "majority"), ("pass_at_n", "pass@N", "pass_at_n"),
           ("final", "final", "final"))
LEGEND = ("avg@N: mean accuracy of the final population (the ZAYA1 report's headline metric); maj@N: its majority "
          "vote; pass@N: any candidate correct; final: the answer the run returned. Brackets: 95% interval over "
          "problems (exact binomial where every problem scores 0 or 1, else a bootstrap over problems).")


@dataclass(frozen=True)
class RunData:
    path: Path
    name: str
    label: str
    task: str
    config: dict[str, Any]
    backend: dict[str, Any]
    summary: Summary
    records: list[ProblemRecord]

    @functools.cached_property
    def figures(self) -> dict[str, Any]:
        """Every figure of the run, intervals included, computed once however many tables and plots read
        them (each interval is a bootstrap or an exact binomial over problems)."""
        return _figures(self)


def method_label(config: dict[str, Any]) -> str:
    core = f"N{config['population']} K{config['k']} T{config['rounds']} β{config['budget']} τ{config['tail']}"
    if config.get("chunk_size"):
        core += f" C{config['chunk_size']}"
    return f"{config['preset']} ({core})" if config.get("preset") else core


def load_run(path: Path) -> RunData:
    meta = read_meta(path) if path.is_dir() else None
    if meta is None:
        raise ConfigError("run", f"{path} is not a run directory (no {RUN_FILE}); give the --out of rsa eval")
    records = read_problems(path / PROBLEMS_FILE)
    backend = meta.get("backend", {})
    if not isinstance(backend, dict):  # format 2 records kind and model side by side
        backend = {"kind": backend, "model": meta.get("model"), "device": meta.get("device")}
    name = str(meta.get("name") or path.resolve().name)
    return RunData(path, name, method_label(meta["config"]), meta["task"], meta["config"], backend,
                   summarise(records), records)


def accuracy(run: RunData, metric: str) -> dict[str, float]:
    """A metric's value over problems with its 95% interval."""
    values = list(per_problem(run.records, metric).values())
    low, high = interval(values) if values else (0.0, 0.0)
    return {"value": mean(values), "low": low, "high": high}


def run_json(run: RunData) -> dict[str, Any]:
    """Every figure of one run, as the report shows it."""
    return run.figures


def _figures(run: RunData) -> dict[str, Any]:
    s = run.summary
    rounds = []
    for index, kind, avg, maj, pass_n, tokens in s.rounds:
        low, high = interval(per_problem_round(run.records, index)) if run.records else (0.0, 0.0)
        rounds.append({"round": index, "kind": kind, "avg_at_n": avg, "avg_at_n_low": low, "avg_at_n_high": high,
                       "majority": maj, "pass_at_n": pass_n, "cumulative_tokens": tokens})
    problems = {pid: {"avg_at_n": v, "final": per_problem(run.records, "final")[pid]}
                for pid, v in per_problem(run.records, "avg").items()}
    return {
        "name": run.name, "path": str(run.path), "task": run.task, "method": run.label,
        "model": run.backend.get("model"), "problems": s.problems,
        "metrics": {key: accuracy(run, metric) for key, _, metric in METRICS},
        "tokens_per_problem": s.tokens_per_problem, "seconds_per_problem": s.seconds_per_problem,
        "rounds": rounds, "per_problem": problems,
    }


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _with_interval(a: dict[str, float]) -> str:
    return f"{_pct(a['value'])} [{_pct(a['low'])}, {_pct(a['high'])}]"


def results_table(runs: list[RunData], published: list[Published] | None = None) -> list[list[str]]:
    header = ["run", "task", "method", "model", "problems", *(label for _, label, _ in METRICS), "tokens/problem",
              "s/problem"]
    rows = [header]
    for run in runs:
        s = run.summary
        rows.append([run.name, run.task, run.label, str(run.backend.get("model", "")), str(s.problems),
                     *(_with_interval(run.figures["metrics"][key]) for key, _, _ in METRICS),
                     f"{s.tokens_per_problem:,.0f}", f"{s.seconds_per_problem:.1f}"])
    for p in published or []:
        rows.append(["published", p.task, p.method, p.model, "", f"{_pct(p.accuracy)} (published)", "", "", "", "",
                     ""])
    return rows


def published_table(published: list[Published]) -> list[list[str]]:
    rows = [["task", "model", "method", "accuracy", "source"]]
    rows += [[p.task, p.model, p.method, _pct(p.accuracy), p.source] for p in published]
    return rows


def rounds_table(runs: list[RunData]) -> list[list[str]]:
    rows = [["run", "task", "round", "avg@N", "maj@N", "pass@N", "cumulative tokens/problem"]]
    for run in runs:
        for r in run_json(run)["rounds"]:
            name = "final" if r["kind"] == "final" else str(r["round"])
            avg = {"value": r["avg_at_n"], "low": r["avg_at_n_low"], "high": r["avg_at_n_high"]}
            rows.append([run.name, run.task, name, _with_interval(avg), _pct(r["majority"]), _pct(r["pass_at_n"]),
                         f"{r['cumulative_tokens']:,.0f}"])
    return rows


def problems_table(runs: list[RunData]) -> list[list[str]]:
    """Problem × run: the final population's fraction correct, and whether the returned answer was (✓/✗)."""
    columns = [run_json(run)["per_problem"] for run in runs]
    ids = sorted({pid for column in columns for pid in column})
    rows = [["problem", *(run.name for run in runs)]]
    for pid in ids:
        cells = []
        for column in columns:
            cell = column.get(pid)
            cells.append("–" if cell is None else f"{_pct(cell['avg_at_n'])} {'✓' if cell['final'] >= 0.5 else '✗'}")
        rows.append([pid, *cells])
    return rows


def _markdown(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows[1:]]
    return "\n".join(lines)


def _html_table(rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows[1:])
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def what_if_rows(runs: list[RunData], thresholds: list[float], min_rounds: int = 0) -> tuple[list[list[str]],
                                                                                            dict[str, list[WhatIf]]]:
    """The what-if of consensus early exit (:mod:`~markov_rsa.evals.whatif`) for each run: a table and its
    points by run name."""
    rows = [["run", "task", "early exit", "final", "tokens/problem", "tokens saved", "stopped early"]]
    points: dict[str, list[WhatIf]] = {}
    for run in runs:
        points[run.name] = what_if(fill_agreement(run.records, run.path), thresholds, min_rounds)
        full = {p.task: p.tokens_per_problem for p in points[run.name] if p.threshold is None}
        for p in points[run.name]:
            saved = 1 - p.tokens_per_problem / full[p.task] if full[p.task] else 0.0
            rows.append([run.name, p.task, "off (as run)" if p.threshold is None else f"{p.threshold:g}",
                         _with_interval({"value": p.accuracy, "low": p.low, "high": p.high}),
                         f"{p.tokens_per_problem:,.0f}", f"{100 * saved:.0f}%", f"{p.stopped_early}/{p.runs}"])
    return rows, points


def _plots(runs: list[RunData], what_ifs: dict[str, list[WhatIf]] | None = None) -> dict[str, bytes]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator, PercentFormatter

    def save(fig: Any) -> bytes:
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png")
        plt.close(fig)
        return buffer.getvalue()

    figures: dict[str, bytes] = {}
    data = [(run, [r for r in run_json(run)["rounds"] if r["kind"] != "final"]) for run in runs]
    for name, xkey, xlabel in (("accuracy_per_round", "round", "round (0 = independent rollouts)"),
                               ("accuracy_vs_tokens", "cumulative_tokens",
                                "generated tokens per problem (cumulative)")):
        fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
        for run, stages in data:
            xs = [r[xkey] for r in stages]
            ys = [100 * r["avg_at_n"] for r in stages]
            errors = [[100 * (r["avg_at_n"] - r["avg_at_n_low"]) for r in stages],
                      [100 * (r["avg_at_n_high"] - r["avg_at_n"]) for r in stages]]
            ax.errorbar(xs, ys, yerr=errors, marker="o", capsize=3, label=f"{run.name} ({run.task})")
            if xkey != "round":
                for r, x, y in zip(stages, xs, ys, strict=True):
                    ax.annotate(f"r{r['round']}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
                for point in (what_ifs or {}).get(run.name, []):  # what consensus early exit would have given
                    label = "as run" if point.threshold is None else f"exit {point.threshold:g}"
                    ax.errorbar([point.tokens_per_problem], [100 * point.accuracy], marker="x", capsize=2,
                                yerr=[[100 * (point.accuracy - point.low)], [100 * (point.high - point.accuracy)]],
                                color="gray", linestyle="none")
                    ax.annotate(f"{label} (final)", (point.tokens_per_problem, 100 * point.accuracy),
                                textcoords="offset points", xytext=(4, -10), fontsize=6, color="gray")
        ax.set_ylim(0, 100)
        ax.yaxis.set_major_formatter(PercentFormatter())
        ax.set_xlabel(xlabel)
        ax.set_ylabel("avg@N accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        if xkey == "round":
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        figures[name] = save(fig)

    table = problems_table(runs)
    columns = [run_json(run)["per_problem"] for run in runs]
    ids = [row[0] for row in table[1:]]
    if ids:
        matrix = [[100 * column[pid]["avg_at_n"] if pid in column else float("nan") for column in columns]
                  for pid in ids]
        fig, ax = plt.subplots(figsize=(max(4.0, 1.4 * len(runs) + 2.5), max(3.0, 0.22 * len(ids) + 1.2)), dpi=110)
        image = ax.imshow(matrix, aspect="auto", cmap="RdYlGn", vmin=0, vmax=100)
        ax.set_xticks(range(len(runs)), [run.name for run in runs], rotation=30, ha="right", fontsize=7)
        ax.set_yticks(range(len(ids)), ids, fontsize=6)
        fig.colorbar(image, ax=ax, label="final population correct (%)")
        figures["per_problem"] = save(fig)
    return figures


def report_json(runs: list[RunData], published: list[Published], figures: list[str]) -> dict[str, Any]:
    return {
        "format": 1,
        "runs": [run_json(run) for run in runs],
        "published": [{"task": p.task, "model": p.model, "method": p.method, "accuracy": p.accuracy,
                       "source": p.source} for p in published],
        "figures": [f"{name}.png" for name in figures],
    }


def write_report(run_dirs: list[Path], out: Path, early_exit: list[float] | None = None,
                 min_rounds: int = 0) -> tuple[Path, Path]:
    """Write ``report.md``, ``report.html``, ``report.json`` and the plots into ``out``; returns the two
    report paths. ``early_exit`` thresholds add what consensus early exit would have given."""
    if not run_dirs:
        raise ConfigError("runs", "give at least one run directory")
    runs = [load_run(Path(p)) for p in run_dirs]
    published = published_for({run.task for run in runs})
    what_if_table, what_ifs = what_if_rows(runs, early_exit, min_rounds) if early_exit else ([], {})
    out.mkdir(parents=True, exist_ok=True)
    plots = _plots(runs, what_ifs)
    for name, png in plots.items():
        (out / f"{name}.png").write_bytes(png)
    summary = report_json(runs, published, list(plots))
    if what_ifs:
        summary["what_if"] = {"min_rounds": min_rounds,
                              "runs": {name: [p.to_dict() for p in points] for name, points in what_ifs.items()}}
    (out / "report.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    table, per_round, per_problem_rows = results_table(runs, published), rounds_table(runs), problems_table(runs)
    credit = MATH_CREDIT if any(run.config.get("task") != "code" for run in runs) else ""
    sections: list[tuple[str, list[list[str]]]] = [("Accuracy by round", per_round),
                                                   ("Per problem (final population % correct; ✓ returned answer "
                                                    "correct)", per_problem_rows)]
    if what_ifs:
        sections.insert(0, ("What if: consensus early exit (replayed from the logged rounds, no model called; "
                            "final = the returned answer)", what_if_table))
    if published:
        sections.insert(0, ("Published figures", published_table(published)))
    md = "\n\n".join([
        "# Markovian RSA results", LEGEND, _markdown(table),
        *(f"## {title}\n\n{_markdown(rows)}" for title, rows in sections),
        *(f"![{name}]({name}.png)" for name in plots), credit,
    ]).strip() + "\n"
    md_path = out / "report.md"
    md_path.write_text(md, encoding="utf-8")
    images = "".join(
        f'<figure><img alt="{name}" src="data:image/png;base64,{base64.b64encode(png).decode()}"></figure>'
        for name, png in plots.items()
    )
    body = "".join(f"<h2>{html.escape(title)}</h2>{_html_table(rows)}" for title, rows in sections)
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>Markovian RSA results</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>body{{font-family:system-ui,sans-serif;margin:2em auto;max-width:72em;padding:0 1em}}
table{{border-collapse:collapse;margin:1em 0;width:100%;table-layout:auto;font-size:.85em}}
th,td{{border:1px solid #ccc;padding:.25em .5em;text-align:right;overflow-wrap:anywhere}}th{{background:#f3f3f3}}
td:first-child,th:first-child{{text-align:left}}figure{{display:inline-block;margin:.5em;max-width:100%}}
img{{max-width:100%;height:auto}}</style></head><body>
<h1>Markovian RSA results</h1><p>{html.escape(LEGEND)}</p>{_html_table(table)}{body}{images}
<p><small>{html.escape(credit)}</small></p></body></html>"""
    html_path = out / "report.html"
    html_path.write_text(page, encoding="utf-8")
    return md_path, html_path
