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
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from markov_rsa.errors import ConfigError
from markov_rsa.evals.compare import Comparison, compare, config_diff
from markov_rsa.evals.intervals import interval_units
from markov_rsa.evals.log import PROBLEMS_FILE, RUN_FILE, ProblemRecord, read_meta, read_problems
from markov_rsa.evals.metrics import Planned, Summary, mean, plan_of, problem_means, summarise, units
from markov_rsa.evals.published import Published, published_for
from markov_rsa.evals.whatif import WhatIf, fill_agreement, what_if
from markov_rsa.rsa.config import RSAConfig

MATH_CREDIT = ("Math problem sets as published by MathArena (matharena.ai); problem statements belong to MAA (AIME) "
               "and HMMT.")
#: The accuracies of a run: key in report.json, column header, per-problem metric.
METRICS = (("avg_at_n", "avg@N", "avg"), ("majority", "maj@N", "majority"), ("pass_at_n", "pass@N", "pass_at_n"),
           ("final", "final", "final"))
LEGEND = ("avg@N: mean accuracy of the final population over the generations that ran (the ZAYA1 report's "
          "headline metric); maj@N: its majority vote; pass@N: any candidate correct; final: the answer the run "
          "returned. Every figure is over the planned problems: a problem that failed or did not finish scores "
          "wrong and is counted under 'incomplete'; a run stopped by a token or time limit is scored on its last "
          "complete round within the limit. Brackets: 95% interval over problems (exact binomial where every "
          "problem scores 0 or 1, else a bootstrap over problems, repeats and generations).")
#: Run-level keys of ``RSAConfig`` the label always shows (N, K, T, β, τ, C); any other setting that
#: differs from the preset (or the defaults) is appended, so two runs of different settings never share one.
_CORE = {"population": "N", "k": "K", "rounds": "T", "budget": "β", "tail": "τ", "chunk_size": "C"}
_UNLABELLED = {"seed", "preset", "task"}


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
    #: The planned problem ids in load order (``None`` for directories older than the plan).
    planned: list[str] | None = None
    repeats: int | None = None

    @functools.cached_property
    def plan(self) -> list[Planned]:
        return plan_of(self.records, self.planned, self.repeats)

    @functools.cached_property
    def figures(self) -> dict[str, Any]:
        """Every figure of the run, intervals included, computed once however many tables and plots read
        them (each interval is a bootstrap or an exact binomial over problems)."""
        return _figures(self)


def method_label(config: dict[str, Any]) -> str:
    """What ran, in a few words: the preset's name only where the settings are the preset's, the core
    settings always, and every other setting that differs from the preset (or the defaults)."""
    core = " ".join(f"{symbol}{config[key]}" for key, symbol in _CORE.items() if config.get(key) is not None)
    preset = config.get("preset")
    try:
        base = (RSAConfig.from_preset(preset) if preset else RSAConfig()).to_dict()
    except (ValueError, KeyError, TypeError):
        base = RSAConfig().to_dict()
    differs = {key: value for key, value in config.items()
               if key not in _UNLABELLED and base.get(key) != value and not (isinstance(value, list)
                                                                             and tuple(value) == base.get(key))}
    extras = ", ".join(f"{key}={value}" for key, value in differs.items() if key not in _CORE)
    if preset and not differs:
        return f"{preset} ({core})"
    label = core + (f"; {extras}" if extras else "")
    return f"{preset}, modified ({label})" if preset else label


def natural_key(text: str) -> list[Any]:
    """II_2 before II_10: digits compare as numbers."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def load_run(path: Path) -> RunData:
    meta = read_meta(path) if path.is_dir() else None
    if meta is None:
        raise ConfigError("run", f"{path} is not a run directory (no {RUN_FILE}); give the --out of rsa eval")
    records = read_problems(path / PROBLEMS_FILE)
    backend = meta.get("backend", {})
    if not isinstance(backend, dict):  # format 2 records kind and model side by side
        backend = {"kind": backend, "model": meta.get("model"), "device": meta.get("device")}
    name = str(meta.get("name") or path.resolve().name)
    planned = meta.get("plan") if isinstance(meta.get("plan"), list) else None
    repeats = int(meta.get("repeats") or 1)
    return RunData(path, name, method_label(meta["config"]), meta["task"], meta["config"], backend,
                   summarise(records, planned, repeats), records, planned, repeats if planned else None)


def accuracy(run: RunData, metric: str, round_index: int | None = None) -> dict[str, float | None]:
    """A metric's value over the planned problems with its 95% interval; none at all (``None``) where
    nothing finished, rather than a zero-width "0.0 [0.0, 0.0]"."""
    if not (run.summary.finished or run.summary.unscored):
        return {"value": None, "low": None, "high": None}
    per = units(run.plan, metric, round_index)
    bounds = interval_units(list(per.values()))
    low, high = bounds if bounds else (None, None)
    return {"value": mean(problem_means(per).values()), "low": low, "high": high}


def incomplete(run: RunData) -> str:
    """What did not run cleanly, next to the numbers it affects (empty for a clean run)."""
    s = run.summary
    parts = []
    if s.failed:
        parts.append(f"{s.failed} failed (scored wrong)")
    if s.missing:
        parts.append(f"{s.missing} not finished (scored wrong)")
    if s.unscored:
        parts.append(f"{s.unscored} stopped before a round fit the limit (scored wrong)")
    if s.stopped:
        parts.append(f"{s.stopped} stopped by a token/time limit")
    if s.failed_generations:
        parts.append(f"{s.failed_generations}/{s.generations} generations failed (not counted in avg@N)")
    if s.repeats[0] != s.repeats[1]:
        parts.append(f"repeats {s.repeats[0]}-{s.repeats[1]} per problem")
    return "; ".join(parts)


def run_json(run: RunData) -> dict[str, Any]:
    """Every figure of one run, as the report shows it."""
    return run.figures


def _figures(run: RunData) -> dict[str, Any]:
    s = run.summary
    rounds = []
    for index, kind, _avg, maj, pass_n, tokens in s.rounds:
        avg = accuracy(run, "avg", index)
        rounds.append({"round": index, "kind": kind, "avg_at_n": avg["value"], "avg_at_n_low": avg["low"],
                       "avg_at_n_high": avg["high"], "majority": maj, "pass_at_n": pass_n,
                       "cumulative_tokens": tokens, "reached": s.reached.get(index, 0)})
    finals = problem_means(units(run.plan, "final"))
    problems = {pid: {"avg_at_n": v, "final": finals[pid],
                      "status": sorted({item.status for item in run.plan if item.problem_id == pid})}
                for pid, v in problem_means(units(run.plan, "avg")).items()}
    return {
        "name": run.name, "path": str(run.path), "task": run.task, "method": run.label,
        "model": run.backend.get("model"), "problems": s.problems,
        "planned": s.planned, "finished": s.finished, "failed": s.failed, "not_finished": s.missing,
        "unscored": s.unscored, "stopped": s.stopped, "generations": s.generations,
        "failed_generations": s.failed_generations, "repeats": list(s.repeats),
        "metrics": {key: accuracy(run, metric) for key, _, metric in METRICS},
        "tokens_per_problem": s.tokens_per_problem, "prompt_tokens_per_problem": s.prompt_tokens_per_problem,
        "tokens_per_correct": s.tokens_per_correct, "seconds_per_problem": s.seconds_per_problem,
        "rounds": rounds, "per_problem": problems, "incomplete": incomplete(run),
    }


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def _with_interval(a: dict[str, float | None]) -> str:
    if a["value"] is None:
        return "–"
    if a["low"] is None or a["high"] is None:
        return _pct(a["value"])
    return f"{_pct(a['value'])} [{_pct(a['low'])}, {_pct(a['high'])}]"


def _problems_cell(run: RunData) -> str:
    s = run.summary
    done = s.finished if s.repeats[1] <= 1 else f"{s.finished} of {sum(1 for _ in run.plan)} runs"
    return str(s.problems) if s.finished == len(run.plan) else f"{s.problems} ({done} finished)"


def results_table(runs: list[RunData], published: list[Published] | None = None) -> list[list[str]]:
    header = ["run", "task", "method", "model", "problems", *(label for _, label, _ in METRICS), "tokens/problem",
              "s/problem", "incomplete"]
    rows = [header]
    for run in runs:
        s = run.summary
        rows.append([run.name, run.task, run.label, str(run.backend.get("model", "")), _problems_cell(run),
                     *(_with_interval(run.figures["metrics"][key]) for key, _, _ in METRICS),
                     f"{s.tokens_per_problem:,.0f}", f"{s.seconds_per_problem:.1f}", incomplete(run) or "none"])
    for p in published or []:
        rows.append(["published", p.task, p.method, p.model, str(p.problems or ""), f"{_pct(p.accuracy)} (published)",
                     "", "", "", "", "", "see Published figures"])
    return rows


def published_table(published: list[Published], runs: list[RunData] | None = None) -> list[list[str]]:
    rows = [["task", "model", "method", "setting", "metric", "accuracy", "problems", "source", "beside"]]
    for p in published:
        subsets = [f"{run.name} covers {run.summary.planned} of {p.problems}" for run in runs or []
                   if run.task == p.task and p.problems and run.summary.planned < p.problems]
        rows.append([p.task, p.model, p.method, p.setting, p.metric, _pct(p.accuracy),
                     str(p.problems or ""), p.source, "; ".join(subsets) + (" (a subset)" if subsets else "")])
    return rows


def pairs(runs: list[RunData]) -> list[tuple[RunData, RunData]]:
    """Each run paired with the first run given for its task (the baseline)."""
    first: dict[str, RunData] = {}
    out = []
    for run in runs:
        if run.task in first:
            out.append((first[run.task], run))
        else:
            first[run.task] = run
    return out


def comparisons(runs: list[RunData]) -> list[Comparison]:
    return [compare(a, b, metric) for a, b in pairs(runs) for metric in ("final", "avg")]


def comparison_table(runs: list[RunData]) -> list[list[str]]:
    rows = [["baseline", "run", "metric", "shared problems", "baseline %", "run %", "difference", "only baseline right",
             "only run right", "test", "p-value"]]
    for c in comparisons(runs):
        label = "final" if c.metric == "final" else "avg@N"
        better = (len(c.only_baseline), len(c.only_run)) if c.metric == "final" else ("", "")
        shared = f"{c.shared}" + (f" ({c.unshared} not shared, left out)" if c.unshared else "")
        rows.append([c.baseline, c.run, label, shared, _pct(c.baseline_value), _pct(c.run_value),
                     f"{100 * c.difference:+.1f}", str(better[0]), str(better[1]), c.test, f"{c.p_value:.4g}"])
    return rows


def config_diff_table(runs: list[RunData]) -> list[list[str]]:
    rows = [["baseline", "run", "setting", "baseline value", "run value"]]
    for a, b in pairs(runs):
        rows += [[a.name, b.name, key, json.dumps(was), json.dumps(now)]
                 for key, (was, now) in config_diff(a, b).items()]
    return rows


def compute_table(runs: list[RunData]) -> list[list[str]]:
    """What each run cost: a reader must see that RSA's accuracy is bought with tokens."""
    rows = [["run", "task", "prompt tokens/problem", "generated tokens/problem", "generated tokens per correct answer",
             "s/problem"]]
    for run in runs:
        s = run.summary
        per_correct = "– (none correct)" if s.tokens_per_correct is None else f"{s.tokens_per_correct:,.0f}"
        rows.append([run.name, run.task, f"{s.prompt_tokens_per_problem:,.0f}", f"{s.tokens_per_problem:,.0f}",
                     per_correct, f"{s.seconds_per_problem:.1f}"])
    return rows


def rounds_table(runs: list[RunData]) -> list[list[str]]:
    rows = [["run", "task", "round", "avg@N", "maj@N", "pass@N", "cumulative tokens/problem", "reached"]]
    for run in runs:
        for r in run_json(run)["rounds"]:
            name = "final" if r["kind"] == "final" else str(r["round"])
            avg = {"value": r["avg_at_n"], "low": r["avg_at_n_low"], "high": r["avg_at_n_high"]}
            rows.append([run.name, run.task, name, _with_interval(avg), _pct(r["majority"]), _pct(r["pass_at_n"]),
                         f"{r['cumulative_tokens']:,.0f}", f"{r['reached']}/{run.summary.finished}"])
    return rows


def problems_table(runs: list[RunData]) -> list[list[str]]:
    """Problem × run: the final population's fraction correct, and whether the returned answer was (✓/✗)."""
    columns = [run_json(run)["per_problem"] for run in runs]
    ids = sorted({pid for column in columns for pid in column}, key=natural_key)
    rows = [["problem", *(run.name for run in runs)]]
    for pid in ids:
        cells = []
        for column in columns:
            cell = column.get(pid)
            if cell is None:
                cells.append("–")
                continue
            text = f"{_pct(cell['avg_at_n'])} {'✓' if cell['final'] >= 0.5 else '✗'}"
            unclean = [status for status in cell.get("status", []) if status != "finished"]
            cells.append(text + (f" ({', '.join(STATUS_WORDS[s] for s in unclean)})" if unclean else ""))
        rows.append([pid, *cells])
    return rows


STATUS_WORDS = {"failed": "failed", "missing": "not finished", "unscored": "no round fit the limit"}


def _markdown(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows[1:]]
    return "\n".join(lines)


def _cell(text: str) -> str:
    """A cell's text; a word with a hyphen is kept whole ("ZAYA1-8B" never ends a line at "ZAYA1-")."""
    return " ".join(f'<span class="nw">{html.escape(word)}</span>' if "-" in word else html.escape(word)
                    for word in text.split(" "))


def _html_table(rows: list[list[str]]) -> str:
    head = "".join(f"<th>{_cell(c)}</th>" for c in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{_cell(c)}</td>" for c in row) + "</tr>" for row in rows[1:])
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


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
    data = [(run, [r for r in run_json(run)["rounds"] if r["kind"] != "final" and r["avg_at_n"] is not None
                   and r["avg_at_n_low"] is not None]) for run in runs]
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
                       "source": p.source, "setting": p.setting, "metric": p.metric, "problems": p.problems}
                      for p in published],
        "figures": [f"{name}.png" for name in figures],
        "comparisons": [c.to_dict() for c in comparisons(runs)],
    }


def write_report(run_dirs: list[Path], out: Path, early_exit: list[float] | None = None,
                 min_rounds: int = 0) -> tuple[Path, Path]:
    """Write ``report.md``, ``report.html``, ``report.json`` and the plots into ``out``; returns the two
    report paths. ``early_exit`` thresholds add what consensus early exit would have given."""
    if not run_dirs:
        raise ConfigError("runs", "give at least one run directory")
    runs = [load_run(Path(p)) for p in run_dirs]
    seen: dict[str, Path] = {}
    for run in runs:
        if run.name in seen:
            raise ConfigError("runs", f"two runs are named {run.name!r} ({seen[run.name]} and {run.path}); give "
                                      "one another name with rsa eval --name NAME on its --out")
        seen[run.name] = run.path
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
                                                   ("Compute", compute_table(runs)),
                                                   ("Per problem (final population % correct; ✓ returned answer "
                                                    "correct)", per_problem_rows)]
    if what_ifs:
        sections.insert(0, ("What if: consensus early exit (replayed from the logged rounds, no model called; "
                            "final = the returned answer)", what_if_table))
    if published:
        sections.insert(0, ("Published figures", published_table(published, runs)))
    if pairs(runs):
        sections += [("Paired comparison (problems both runs planned)", comparison_table(runs)),
                     ("Settings that differ", config_diff_table(runs))]
    md = "\n\n".join([
        "# Markovian RSA results", LEGEND, _markdown(table),
        *(f"## {title}\n\n{_markdown(rows)}" for title, rows in sections),
        *(f"![{name}]({name}.png)" for name in plots), credit,
    ]).strip() + "\n"
    from markov_rsa.evals.samples import samples_html

    views = {}
    for run in runs:  # one per-sample page per run, linked from the report
        views[run.name] = f"samples-{re.sub(r'[^A-Za-z0-9_.-]+', '_', run.name)}.html"
        (out / views[run.name]).write_text(samples_html(run.path), encoding="utf-8")
    links = "Per-sample views: " + ", ".join(f"[{name}]({file})" for name, file in views.items())
    md = md.replace("\n\n## ", f"\n\n{links}\n\n## ", 1)
    md_path = out / "report.md"
    md_path.write_text(md, encoding="utf-8")
    images = "".join(
        f'<figure><img alt="{name}" src="data:image/png;base64,{base64.b64encode(png).decode()}"></figure>'
        for name, png in plots.items()
    )
    body = "".join(f"<h2>{html.escape(title)}</h2>{_html_table(rows)}" for title, rows in sections)
    link_html = ", ".join(f'<a href="{html.escape(file)}">{html.escape(name)}</a>' for name, file in views.items())
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>Markovian RSA results</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>body{{font-family:system-ui,sans-serif;margin:2em auto;max-width:72em;padding:0 1em}}
table{{border-collapse:collapse;margin:1em 0;width:100%;table-layout:auto;font-size:.85em}}
th,td{{border:1px solid #ccc;padding:.25em .5em;text-align:right;overflow-wrap:normal;word-break:normal;
hyphens:none}}th{{background:#f3f3f3}}.scroll{{overflow-x:auto;max-width:100%}}
.nw{{white-space:nowrap}}
td:first-child,th:first-child{{text-align:left}}figure{{display:inline-block;margin:.5em;max-width:100%}}
img{{max-width:100%;height:auto}}</style></head><body>
<h1>Markovian RSA results</h1><p>{html.escape(LEGEND)}</p>{_html_table(table)}<p>Per-sample views: {link_html}</p>
{body}{images}
<p><small>{html.escape(credit)}</small></p></body></html>"""
    html_path = out / "report.html"
    html_path.write_text(page, encoding="utf-8")
    return md_path, html_path
