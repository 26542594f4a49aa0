"""Reports people can publish from, one owner for the run log, and room for new benchmarks.

Runs come from real evaluations against a loopback server whose answers are right for some seeds and
wrong for others; the HTML report is checked the way a reader sees it, in headless Chromium.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from markov_rsa import RSAConfig
from markov_rsa.backends.openai import OpenAIBackend
from markov_rsa.evals.benchmarks import BENCHMARKS, Benchmark, Grader, load_task, register, unregister
from markov_rsa.evals.datasets import Problem, load_lcb
from markov_rsa.evals.grading.code import CodeGrader
from markov_rsa.evals.grading.math import MathGrader
from markov_rsa.evals.intervals import bootstrap, clopper_pearson, interval
from markov_rsa.evals.log import CandidateRecord, read_candidates
from markov_rsa.evals.report import write_report
from markov_rsa.evals.runner import EvalSpec, Evaluation
from tests.conftest import DATASETS
from tests.servers import FaultServer, serve_app
from tests.test_openai_backend import FAST

RSA = RSAConfig(population=4, k=2, rounds=1, budget=5000, tail=20, seed=3, preset="light")
SINGLE = RSAConfig(population=1, k=1, rounds=0, budget=5000, tail=20, seed=3, preset="parallel")


def mixed(body):
    """Right for two seeds in three (gold 70 for AIME 2025 I #1, the others wrong), with a long trace."""
    right = body.get("seed", 1) % 3 != 0
    return ("Thinking. " * 400) + ("\\boxed{70}" if right else "\\boxed{12}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two runs of the same preset family under different names, and a single-rollout run."""
    root = tmp_path_factory.mktemp("runs")
    problems = load_task("aime25", DATASETS)[:6]
    server = FaultServer(reply=mixed)
    with serve_app(server.app()) as url, MathGrader() as grader:
        backend = OpenAIBackend(f"{url}/v1", model="m", retry=FAST)
        import asyncio

        for name, config in (("rsa-a", RSA), ("rsa-b", RSA.replace(seed=4)), ("single", SINGLE)):
            spec = EvalSpec("aime25", config, name=name)
            asyncio.run(Evaluation(spec, backend, problems, root / name, math_grader=grader).run())
        asyncio.run(backend.aclose())
    return root


@pytest.fixture(scope="module")
def report(runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    write_report([runs / "rsa-a", runs / "rsa-b", runs / "single"], out)
    return out, json.loads((out / "report.json").read_text())


# -- reports ------------------------------------------------------------------------------------
def test_runs_are_told_apart_by_name(report):
    out, data = report
    assert [r["name"] for r in data["runs"]] == ["rsa-a", "rsa-b", "single"]
    md = (out / "report.md").read_text()
    assert "| rsa-a | aime25 | light" in md and "| rsa-b | aime25 | light" in md


def test_intervals_are_right_on_known_cases():
    low, high = clopper_pearson(7, 10)
    assert (round(low, 4), round(high, 4)) == (0.3475, 0.9333)
    assert clopper_pearson(0, 30)[0] == 0.0 and round(clopper_pearson(0, 30)[1], 4) == 0.1157
    assert interval([1.0, 0.0, 1.0, 1.0]) == clopper_pearson(3, 4), "0/1 per problem: exact binomial"
    low, high = bootstrap([0.25, 0.5, 0.75, 1.0, 0.5, 0.25])
    assert 0.25 <= low < 0.54 < high <= 0.9


def test_every_accuracy_carries_its_interval(report):
    _, data = report
    for run in data["runs"]:
        finals = list(v["final"] for v in run["per_problem"].values())
        final = run["metrics"]["final"]
        assert (final["low"], final["high"]) == clopper_pearson(int(sum(finals)), len(finals))
        for metric in run["metrics"].values():
            assert 0 <= metric["low"] <= metric["value"] <= metric["high"] <= 1
        assert all(r["avg_at_n_low"] <= r["avg_at_n"] <= r["avg_at_n_high"] for r in run["rounds"])


def test_per_problem_table_and_heatmap(report):
    out, data = report
    ids = {p.id for p in load_task("aime25", DATASETS)[:6]}
    for run in data["runs"]:
        assert set(run["per_problem"]) == ids
    md = (out / "report.md").read_text()
    assert "## Per problem" in md and "aime_2025_I_1" in md
    assert (out / "per_problem.png").stat().st_size > 1000 and "per_problem.png" in data["figures"]


def test_published_figures_are_shown_beside_runs_and_marked(report):
    out, data = report
    [published] = data["published"]
    assert published["task"] == "aime25" and published["accuracy"] == 0.919 and "2605.05365" in published["source"]
    md = (out / "report.md").read_text()
    assert "91.9 (published)" in md and "## Published figures" in md


BROWSER_PROBE = """<script>
window.addEventListener('load', () => {
  const outside = performance.getEntriesByType('resource').map(e => e.name)
    .filter(n => !n.startsWith('data:') && !n.startsWith('file:'));
  const images = [...document.images].map(i => i.complete && i.naturalWidth > 0);
  const tables = [...document.querySelectorAll('table')]
    .map(t => t.parentElement.clientWidth <= document.body.clientWidth + 1);
  const page = document.documentElement.scrollWidth <= window.innerWidth + 1;
  // A word split across lines has more than one box: list every such word ("proble ms").
  const broken = [];
  for (const cell of document.querySelectorAll('th, td')) {
    const walker = document.createTreeWalker(cell, NodeFilter.SHOW_TEXT);
    for (let node = walker.nextNode(); node; node = walker.nextNode()) {
      for (const m of node.textContent.matchAll(/\\S+/g)) {
        const range = document.createRange();
        range.setStart(node, m.index);
        range.setEnd(node, m.index + m[0].length);
        const lines = new Set([...range.getClientRects()].map(r => Math.round(r.top)));
        if (lines.size > 1) broken.push(m[0]);
      }
    }
  }
  document.title = JSON.stringify({outside, images, tables, page, broken});
});
</script></body>"""


def browse(page: Path, width: int) -> dict:
    result = subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", f"--user-data-dir={tempfile.mkdtemp()}",
         f"--window-size={width},900", "--virtual-time-budget=5000", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=120,
    )
    title = result.stdout.split("<title>", 1)[1].split("</title>", 1)[0].replace("&quot;", '"')
    return json.loads(html_unescape(title))


def html_unescape(text: str) -> str:
    import html

    return html.unescape(text)


@pytest.mark.parametrize("width", [1280, 800])
def test_report_html_reads_right_in_a_browser(report, tmp_path, width):
    """Headless Chromium loads the page: no request leaves it, every figure shows, every table fits (or
    scrolls inside its own box), and no word in a table is broken across lines, at 1280 and 800 px."""
    out, _ = report
    page = tmp_path / "check.html"
    page.write_text((out / "report.html").read_text().replace("</body>", BROWSER_PROBE))
    seen = browse(page, width)
    assert seen["outside"] == [], "the report loads nothing from outside"
    assert len(seen["images"]) == 3 and all(seen["images"]), "every figure shows"
    assert seen["tables"] and all(seen["tables"]), "every table fits the page"
    assert seen["page"], "the page itself never scrolls sideways"
    assert seen["broken"] == [], f"words broken across lines: {seen['broken'][:10]}"


# -- runs ---------------------------------------------------------------------------------------
def test_the_log_keeps_each_candidates_full_text(runs):
    candidates = read_candidates(runs / "rsa-a" / "candidates.jsonl")
    assert candidates and all(c.text.startswith("Thinking. ") and c.text.endswith("}") for c in candidates)
    raw = (runs / "rsa-a" / "candidates.jsonl").read_text()
    assert '"text_z"' in raw and "Thinking. Thinking." not in raw, "long texts are stored compressed"
    record = CandidateRecord("a", "p", 0, 0, 0, text="x" * 5000, reasoning="why")
    assert CandidateRecord.from_dict(json.loads(json.dumps(record.to_dict()))) == record


def test_rsa_show_prints_a_problems_population_round_by_round(runs):
    listing = subprocess.run([sys.executable, "-m", "markov_rsa", "show", str(runs / "rsa-a")],
                             capture_output=True, text=True, timeout=60, env={**os.environ, "COLUMNS": "160"})
    assert listing.returncode == 0 and "aime_2025_I_1" in listing.stdout
    one = subprocess.run([sys.executable, "-m", "markov_rsa", "show", str(runs / "rsa-a"), "aime_2025_I_1"],
                         capture_output=True, text=True, timeout=60, env={**os.environ, "COLUMNS": "160"})
    assert one.returncode == 0, one.stderr
    assert "round 0" in one.stdout and "round 1" in one.stdout and "agree" in one.stdout
    assert "gold '70'" in one.stdout and "Thinking." in one.stdout, "answers, parents and the tails carried"
    missing = subprocess.run([sys.executable, "-m", "markov_rsa", "show", str(runs / "rsa-a"), "nope"],
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and len(missing.stderr.strip().splitlines()) == 1


def rsa_flags(command: str) -> set[str]:
    from typer.main import get_command

    from markov_rsa.cli.app import app

    group = get_command(app)
    params = group.commands[command].params  # type: ignore[attr-defined]
    return {name for p in params for name in p.opts if name.startswith("--")}


def test_solve_and_eval_take_the_same_settings():
    from markov_rsa.cli.options import RSA_OPTIONS
    from markov_rsa.rsa.config import RSAConfig as Config

    solve, evaluate = rsa_flags("solve"), rsa_flags("eval")
    settings = {"--" + name.replace("_", "-") for name in RSA_OPTIONS}
    assert settings <= solve and settings <= evaluate
    fields = {f.replace("_", "-") for f in Config.__dataclass_fields__} - {"task"}
    assert {"--" + f for f in fields} <= settings, "every RSAConfig setting is a flag"


def test_choices_show_in_help_and_python_m_works():
    out = subprocess.run([sys.executable, "-m", "markov_rsa", "solve", "--help"], capture_output=True, text=True,
                         timeout=60, env={**os.environ, "COLUMNS": "200"})
    assert out.returncode == 0 and "majority|aggregate|population" in out.stdout and "new|context" in out.stdout


def test_eval_json_prints_the_summary(tmp_path):
    server = FaultServer(reply=mixed)
    with serve_app(server.app()) as url:
        out = subprocess.run(
            [sys.executable, "-m", "markov_rsa", "eval", "aime25", "--out", str(tmp_path / "r"), "--data-dir",
             str(DATASETS), "--base-url", f"{url}/v1", "--model", "m", "--limit", "2", "--population", "2",
             "--k", "2", "--rounds", "1", "--budget", "100", "--tail", "10", "--json", "--name", "mine"],
            capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary["name"] == "mine" and summary["problems"] == 2 and "final" in summary["metrics"]


def test_release_selects_files_of_a_local_hub_layout_copy(tmp_path):
    row = json.loads((DATASETS / "livecodebench" / "code_generation_lite_1873_A.jsonl").read_text())
    (tmp_path / "test.jsonl").write_text(json.dumps(row) + "\n")
    (tmp_path / "test2.jsonl").write_text(json.dumps({**row, "question_id": "later"}) + "\n")
    assert [p.id for p in load_lcb(tmp_path, release="v1")] == ["1873_A"]
    assert [p.id for p in load_lcb(tmp_path, release="v2")] == ["1873_A", "later"]


# -- structure ----------------------------------------------------------------------------------
def test_a_new_benchmark_is_one_registration(tmp_path):
    def load(data_dir=None, **options):
        return [Problem("toy_1", "toy", "What is 6 times 7?", answer="42"),
                Problem("toy_2", "toy", "What is 2 to the tenth?", answer="1024")]

    register(Benchmark("toy", "two toy questions", load, "integer", "aime", lambda **o: MathGrader()))
    try:
        server = FaultServer(reply=lambda body: "\\boxed{42}")
        with serve_app(server.app()) as url:
            out = subprocess.run(
                [sys.executable, "-c", "import sys; from markov_rsa.evals.benchmarks import register, Benchmark; "
                 "from tests.test_reports import toy; register(toy()); from markov_rsa.cli.app import main; "
                 "sys.argv = ['rsa', *sys.argv[1:]]; main()",
                 "eval", "toy", "--out", str(tmp_path / "toy"), "--base-url", f"{url}/v1", "--model", "m",
                 "--population", "2", "--k", "2", "--rounds", "0", "--budget", "50", "--tail", "10", "--json"],
                capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["metrics"]["final"]["value"] == 0.5
        assert "toy" in BENCHMARKS
    finally:
        unregister("toy")
    assert "toy" not in BENCHMARKS


def toy() -> Benchmark:
    def load(data_dir=None, **options):
        return [Problem("toy_1", "toy", "What is 6 times 7?", answer="42"),
                Problem("toy_2", "toy", "What is 2 to the tenth?", answer="1024")]

    return Benchmark("toy", "two toy questions", load, "integer", "aime", lambda **o: MathGrader())


def test_the_graders_share_one_protocol():
    assert isinstance(MathGrader(), Grader)
    assert isinstance(CodeGrader(), Grader)


def test_the_server_is_library_code():
    from markov_rsa.backends.factory import BackendOptions, build_backend
    from markov_rsa.server import create_app

    assert create_app.__module__ == "markov_rsa.server.app"
    assert build_backend(BackendOptions(base_url=("http://127.0.0.1:9/v1",), model="m")).info.kind == "openai"
    assert not list((Path(__file__).parent.parent / "markov_rsa" / "cli").glob("serve.py"))


# -- paired comparison ----------------------------------------------------------------------------
def test_two_runs_compare_paired_with_a_known_p_value(tmp_path):
    """Eight shared problems: the second model gets five right that the first gets wrong and none the
    other way (two both right, one neither), so exact McNemar gives p = 2 * 0.5**5 = 0.0625."""
    import asyncio

    items = load_task("aime25", DATASETS)[:8]

    def reply(body):
        text = json.dumps(body["messages"])
        index = next(i for i, p in enumerate(items) if json.dumps(p.problem)[1:40] in text)
        right = index >= 6 or (body["model"] == "better" and index < 5)
        return f"so \\boxed{{{items[index].answer if right else 'nope'}}}"

    server = FaultServer(reply=reply)
    config = RSAConfig(population=1, k=1, rounds=0, budget=50, tail=10, seed=1)
    with serve_app(server.app()) as url, MathGrader() as grader:
        for name, model, size in (("base", "plain", 8), ("better", "better", 8)):
            backend = OpenAIBackend(f"{url}/v1", model=model, retry=FAST)
            spec = EvalSpec("aime25", config.replace(population=2 if name == "better" else 1), name=name)
            asyncio.run(Evaluation(spec, backend, items[:size], tmp_path / name, math_grader=grader).run())
            asyncio.run(backend.aclose())
    write_report([tmp_path / "base", tmp_path / "better"], tmp_path / "report")
    data = json.loads((tmp_path / "report" / "report.json").read_text())
    [final, avg] = data["comparisons"]
    assert final["shared"] == 8 and final["test"] == "exact McNemar"
    assert sorted(final["only_run"]) == sorted(p.id for p in items[:5]) and final["only_baseline"] == []
    assert final["p_value"] == pytest.approx(0.0625) and final["difference"] == pytest.approx(5 / 8)
    assert avg["metric"] == "avg" and avg["difference"] == pytest.approx(5 / 8)
    md = (tmp_path / "report" / "report.md").read_text()
    assert "## Paired comparison" in md and "| 0.0625 |" in md
    assert "## Settings that differ" in md and '| base | better | model | "plain" | "better" |' in md
    assert '| base | better | population | 1 | 2 |' in md


def test_paired_tests_match_their_definitions():
    from markov_rsa.evals.compare import mcnemar_exact, sign_flip

    assert mcnemar_exact(0, 5) == pytest.approx(0.0625) and mcnemar_exact(3, 3) == 1.0
    assert mcnemar_exact(1, 9) == pytest.approx(2 * (1 + 10) / 2**10)
    assert sign_flip([0.5, 0.5, 0.5]) == pytest.approx(2 / 8), "only all-plus and all-minus are as extreme"
    assert sign_flip([0.0, 0.0]) == 1.0


# -- export and inspection --------------------------------------------------------------------------
def test_samples_export_to_csv_parquet_and_pandas_in_natural_order(runs, tmp_path):
    import csv

    import pyarrow.parquet as pq

    from markov_rsa.evals.samples import COLUMNS, samples_df

    frame = samples_df(runs / "rsa-a")
    assert list(frame.columns) == list(COLUMNS) and len(frame) == 6 * 4 * 2, "6 problems, 4 candidates, 2 rounds"
    ids = list(dict.fromkeys(frame["problem_id"]))
    assert ids == [f"aime_2025_I_{i}" for i in range(1, 7)]
    assert set(frame["round"]) == {0, 1} and frame["correct"].dtype == bool
    assert (frame.groupby("problem_id")["returned_correct"].nunique() == 1).all()
    out = subprocess.run([sys.executable, "-m", "markov_rsa.cli.app", "export", str(runs / "rsa-a"), "--out",
                          str(tmp_path / "s.csv"), "--no-texts"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    with (tmp_path / "s.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(frame) and rows[0]["text"] == "" and rows[0]["problem_id"] == "aime_2025_I_1"
    out = subprocess.run([sys.executable, "-m", "markov_rsa.cli.app", "export", str(runs / "rsa-a"), "--out",
                          str(tmp_path / "s.parquet")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    table = pq.read_table(tmp_path / "s.parquet")
    assert table.num_rows == len(frame) and "Thinking." in table.column("text")[0].as_py()


def test_natural_problem_order():
    from markov_rsa.evals.report import natural_key

    assert sorted(["II_10", "II_2", "II_1", "I_3"], key=natural_key) == ["II_1", "II_2", "II_10", "I_3"]


def test_the_per_sample_view_reads_right_in_a_browser(report, tmp_path):
    out, _ = report
    page = out / "samples-rsa-a.html"
    text = page.read_text()
    assert "aime_2025_I_1 (repeat 0)" in text and "round 1:" in text and "<details>" in text
    assert 'href="samples-rsa-a.html"' in (out / "report.html").read_text()
    check = tmp_path / "samples.html"
    check.write_text(text.replace("</body>", BROWSER_PROBE))
    seen = browse(check, 800)
    assert seen["outside"] == [] and seen["page"], "nothing from outside; no sideways scrolling"
    assert seen["broken"] == [], f"words broken across lines: {seen['broken'][:10]}"
