"""The evaluation harness: datasets, graders, the code sandbox, metrics, resumable runs, reports."""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import pickle
import re
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest

from markov_rsa import ConfigError, RSAConfig
from markov_rsa.backends.openai import OpenAIBackend
from markov_rsa.evals.benchmarks import load_task
from markov_rsa.evals.datasets import MATH_SETS, decode_private_tests, lcb_problem, load_lcb
from markov_rsa.evals.grading.code import CodeGrader, functional_matches, stdin_matches
from markov_rsa.evals.grading.math import MathGrader
from markov_rsa.evals.grading.sandbox import Sandbox, SandboxLimits, bwrap_works
from markov_rsa.evals.log import ProblemRecord, read_jsonl
from markov_rsa.evals.metrics import pass_at_k, summarise
from markov_rsa.evals.runner import EvalSpec, Evaluation
from markov_rsa.rsa.answers import extract_boxed
from tests.conftest import DATASETS
from tests.servers import FaultServer, serve_app
from tests.test_openai_backend import FAST

MATH_COUNTS = {"aime24": 30, "aime25": 30, "aime26": 30, "hmmt24": 30, "hmmt25": 30, "hmmt26": 33}


@pytest.fixture(scope="module")
def math_grader():
    with MathGrader(workers=2) as grader:
        yield grader


# -- datasets ------------------------------------------------------------------------------------
def test_shared_math_sets_load_from_a_data_dir():
    for task, count in MATH_COUNTS.items():
        problems = load_task(task, DATASETS)
        assert len(problems) == count and all(p.answer and p.problem for p in problems)
    assert load_task("aime25", DATASETS / "math")[0].id == "aime_2025_I_1"


def test_missing_data_gives_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match=r"no aime_2025\.jsonl in"):
        load_task("aime25", tmp_path)
    with pytest.raises(ConfigError, match="unknown benchmark 'aime99'"):
        load_task("aime99", tmp_path)


def test_real_livecodebench_row_decodes_its_private_tests():
    [problem] = load_lcb(DATASETS / "livecodebench")
    assert problem.id == "1873_A" and problem.func_name is None
    assert len(problem.public_tests) == 1 and len(problem.private_tests) == 4
    assert all(t.testtype == "stdin" for t in problem.private_tests)
    assert load_lcb(DATASETS / "livecodebench", since="2023-09-01") == []
    assert len(load_lcb(DATASETS / "livecodebench", since="2023-08-01", until="2023-08-31")) == 1


def test_private_test_decoder_refuses_every_global():
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > /tmp/markov-rsa-pwned",))

    blob = base64.b64encode(zlib.compress(pickle.dumps(Evil()))).decode()
    with pytest.raises(pickle.UnpicklingError, match="refusing to load global"):
        decode_private_tests(blob)
    assert not Path("/tmp/markov-rsa-pwned").exists()


def leetcode_row(tests: list[dict]) -> dict:
    """A call-based row in code_generation_lite's layout (none ships offline)."""
    private = base64.b64encode(zlib.compress(pickle.dumps(json.dumps(tests[1:])))).decode()
    return {
        "question_title": "Two Sum", "question_content": "Return indices of the two numbers adding to target.",
        "platform": "leetcode", "question_id": "1", "contest_id": "weekly-1", "contest_date": "2023-09-01T00:00:00",
        "starter_code": "class Solution:\n    def twoSum(self, nums: List[int], target: int) -> List[int]:\n",
        "difficulty": "easy", "public_test_cases": json.dumps(tests[:1]), "private_test_cases": private,
        "metadata": json.dumps({"func_name": "twoSum"}),
    }


TWO_SUM_TESTS = [
    {"input": "[2, 7, 11, 15]\n9", "output": "[0, 1]", "testtype": "functional"},
    {"input": "[3, 2, 4]\n6", "output": "[1, 2]", "testtype": "functional"},
    {"input": "[3, 3]\n6", "output": "[0, 1]", "testtype": "functional"},
]
TWO_SUM = """class Solution:
    def twoSum(self, nums: List[int], target: int) -> List[int]:
        seen = {}
        for i, x in enumerate(nums):
            if target - x in seen:
                return (seen[target - x], i)
            seen[x] = i
"""
SHORT_SORT = """t = int(input())
for _ in range(t):
    s = input().strip()
    print("YES" if sum(a != b for a, b in zip(s, "abc")) in (0, 2) else "NO")
"""


# -- math grading ----------------------------------------------------------------------------------
async def test_every_gold_answer_grades_correct_against_its_boxed_self(math_grader):
    items = []
    for task in MATH_COUNTS:
        integer = MATH_SETS[task].integer_answers
        items += [(extract_boxed(f"so \\boxed{{{p.answer}}}"), p.answer, integer) for p in load_task(task, DATASETS)]
    results = await math_grader.grade_many(items)
    wrong = [gold for (_, gold, _), ok in zip(items, results, strict=True) if not ok]
    assert wrong == [] and len(items) == 183


async def test_wrong_empty_and_truncated_answers_grade_wrong(math_grader):
    aime = load_task("aime25", DATASETS)
    hmmt = load_task("hmmt25", DATASETS)
    items = [(str(int(p.answer) + 1), p.answer, True) for p in aime[:5]]
    items += [("\\frac{1}{7919}", p.answer, False) for p in hmmt[:5]]
    items += [(None, "70", True), ("", "70", True), (extract_boxed("the answer is 7"), "70", True)]
    items += [(extract_boxed("\\boxed{\\frac{-1+\\sqrt{17}}{2}}"), hmmt[9].answer, False)]  # half of a list
    assert not any(await math_grader.grade_many(items))
    assert await math_grader.grade("070", "70", True) and await math_grader.grade("0.5", "\\frac{1}{2}", False)


@pytest.mark.parametrize(("answer", "gold", "integer", "correct"), [
    # integer sets: what a careful human grader accepts
    ("42.", "42", True, True), ("42;", "42", True, True), ("042", "42", True, True), ("\\text{42}", "42", True, True),
    ("42^\\circ", "42", True, True), ("1,000", "1000", True, True), ("1\\,000", "1000", True, True),
    ("{42}", "42", True, True), ("$42$", "42", True, True),
    # ... and rejects
    ("3,4", "34", True, False), ("34,", "3", True, False), ("4.2", "42", True, False), ("-42", "42", True, False),
    ("12,34", "1234", True, False), ("43", "42", True, False),
    # symbolic sets
    ("\\frac{1}{2}", "0.5", False, True), ("\\dfrac12", "\\frac{1}{2}", False, True),
    ("\\sqrt3", "\\sqrt{3}", False, True), ("2\\sqrt{2}", "\\sqrt{8}", False, True),
    ("\\frac{\\sqrt3}{2}", "\\frac{\\sqrt{3}}{2}", False, True), ("\\sqrt{2}", "\\sqrt{3}", False, False),
    ("\\frac{1}{3}", "0.33", False, False), ("\\pi", "3.14", False, False),
])
async def test_graders_accept_and_reject_answer_forms_as_a_careful_human_would(math_grader, answer, gold, integer,
                                                                             correct):
    assert await math_grader.grade(answer, gold, integer) is correct


# -- code grading and the sandbox --------------------------------------------------------------
def test_output_comparison_follows_livecodebench():
    assert stdin_matches("YES\nNO  \n", "YES\nNO\n") and stdin_matches("1.50 2\n", "1.5 2.0")
    assert not stdin_matches("YES\n", "YES\nNO\n") and not stdin_matches("1.5", "1.6")
    assert functional_matches("[0, 1]", "[0,1]") and not functional_matches("[1, 0]", "[0, 1]")


@pytest.fixture(scope="module")
def grader():
    return CodeGrader(Sandbox(SandboxLimits(cpu_seconds=2, wall_seconds=4, memory_mb=512)))


async def test_sandbox_grades_correct_wrong_and_slow_programs(grader):
    [problem] = load_lcb(DATASETS / "livecodebench")
    assert await grader.grade(SHORT_SORT, problem)
    assert not await grader.grade(SHORT_SORT.replace("(0, 2)", "(0,)"), problem)
    assert not await grader.grade("while True:\n    pass\n", problem)
    assert not await grader.grade(None, problem)
    assert await grader.public_score(SHORT_SORT, problem) == 1


async def test_call_based_problem_uses_solution_method_and_tuples_as_lists(grader):
    problem = lcb_problem(leetcode_row(TWO_SUM_TESTS))
    assert problem.func_name == "twoSum" and len(problem.private_tests) == 2
    assert await grader.grade(TWO_SUM, problem)
    assert not await grader.grade(TWO_SUM.replace("return (seen[target - x], i)", "return [i, i]"), problem)


async def test_public_tests_run_once_per_program_for_grading_and_selection(grader):
    from collections import Counter

    from markov_rsa.evals.runner import PublicTests

    [problem] = load_lcb(DATASETS / "livecodebench")
    runs: Counter[str] = Counter()

    class Counting(CodeGrader):
        async def run_test(self, program, test, func_name):
            runs[program] += test in problem.public_tests
            return await super().run_test(program, test, func_name)

    public = PublicTests(Counting(grader.sandbox), problem)
    wrong = SHORT_SORT.replace("(0, 2)", "(0,)")
    assert await public.grade(SHORT_SORT) == await grader.grade(SHORT_SORT, problem) is True
    assert await public.grade(wrong) == await grader.grade(wrong, problem) is False
    assert await public.score(SHORT_SORT) == 1 and await public.score(wrong) == 0
    assert runs == {SHORT_SORT: 1, wrong: 1}, "each program ran its public test once"


def test_bubblewrap_isolation_is_used_where_it_works():
    assert bwrap_works(), "make test installs bubblewrap; the sandbox must use it here"
    assert Sandbox().isolation == "bwrap"
    outcome = Sandbox().run("import os\nprint(os.getuid(), os.getpid())", "")
    assert outcome.status == "ok" and outcome.stdout.split()[0] == "65534"


# -- metrics ---------------------------------------------------------------------------------------
def test_pass_at_k_unbiased_estimator():
    assert pass_at_k(16, 0, 1) == 0.0 and pass_at_k(16, 16, 1) == 1.0
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25) and pass_at_k(4, 1, 2) == pytest.approx(0.5)
    assert pass_at_k(10, 3, 10) == 1.0 and pass_at_k(5, 2, 3) == pytest.approx(1 - 1 / 10)


def test_summary_reduces_rounds_and_repeats():
    def record(pid, rounds, correct, repeat=0):
        scores = [{"round": i, "kind": "initial" if i == 0 else "aggregate", "n": 4, "correct": c,
                   "majority": c > 2, "completion_tokens": 100, "avg": c / 4, "pass_at_n": float(c > 0)}
                  for i, c in enumerate(rounds)]
        return ProblemRecord(attempt="a1", problem_id=pid, repeat=repeat, task="aime25", rounds=scores,
                             population=scores[-1], correct=correct, completion_tokens=100 * len(rounds), seconds=2.0)

    summary = summarise([record("a", [1, 3], True), record("b", [0, 2], False), record("a", [2, 4], True, 1)])
    # Repeats are averaged within a problem first, then problems: "a" (two repeats) weighs as much as "b".
    assert summary.problems == 2 and summary.final == pytest.approx(1 / 2)
    assert summary.avg_at_n == pytest.approx(((3 / 4 + 4 / 4) / 2 + 2 / 4) / 2)
    assert [r[2] for r in summary.rounds] == [pytest.approx((3 / 8 + 0) / 2), pytest.approx(summary.avg_at_n)]
    assert [r[5] for r in summary.rounds] == [100, 200]


def test_unequal_repeats_give_one_avg_for_the_headline_and_its_round_row():
    """The headline avg@N and the same stage's round row are one reduction, with one interval."""
    from markov_rsa.evals.report import run_json

    def record(pid, correct, repeat):
        score = {"round": 0, "kind": "initial", "n": 4, "correct": correct, "majority": correct > 2,
                 "completion_tokens": 40}
        return ProblemRecord(attempt=f"{pid}{repeat}", problem_id=pid, repeat=repeat, task="aime25", rounds=[score],
                             population=score, correct=correct > 2, scored_round=0)

    records = [record("p1", 4, 0), record("p1", 4, 1), record("p1", 3, 2), record("p2", 1, 0), record("p3", 2, 0),
               record("p3", 0, 1)]
    run = _run_data(records)
    data = run_json(run)
    [row] = data["rounds"]
    headline = data["metrics"]["avg_at_n"]
    assert row["avg_at_n"] == pytest.approx(headline["value"])
    assert (row["avg_at_n_low"], row["avg_at_n_high"]) == (headline["low"], headline["high"])
    assert "repeats 1-3 per problem" in data["incomplete"]


def _run_data(records, planned=None, repeats=None, config=None):
    from markov_rsa.evals.report import RunData, method_label

    config = (config or RSAConfig(population=4, k=2, rounds=0)).to_dict()
    return RunData(Path("run"), "run", method_label(config), "aime25", config, {"model": "m"},
                   summarise(records, planned, repeats), records, planned, repeats)


# -- runs --------------------------------------------------------------------------------------------
def boxed_gold(body):
    """A fault-server reply that answers AIME 2025 I #1 (gold 70) correctly for even seeds."""
    return "Thinking hard. \\boxed{70}" if body.get("seed", 1) % 2 == 0 else "Unsure. \\boxed{12}"


async def test_math_run_logs_every_candidate_and_scores_rounds(tmp_path, math_grader):
    server = FaultServer(reply=boxed_gold)
    with serve_app(server.app()) as url:
        backend = OpenAIBackend(f"{url}/v1", model="m", retry=FAST)
        spec = EvalSpec("aime25", RSAConfig(population=4, k=2, rounds=2, budget=100, tail=20, seed=3), limit=3)
        progress = await Evaluation(spec, backend, load_task("aime25", DATASETS), tmp_path,
                                    math_grader=math_grader).run()
    assert progress.done == 3 and not progress.failed
    candidates = list(read_jsonl(tmp_path / "candidates.jsonl"))
    problems = list(read_jsonl(tmp_path / "problems.jsonl"))
    assert len(candidates) == 3 * 4 * 3 and len(problems) == 3
    first = next(p for p in problems if p["problem_id"] == "aime_2025_I_1")
    logged = [c for c in candidates if c["problem_id"] == "aime_2025_I_1"]
    assert sum(c["correct"] for c in logged) == sum(r["correct"] for r in first["rounds"])
    assert all({"tail", "answer", "correct", "completion_tokens", "round", "seconds"} <= set(c) for c in logged)
    assert [r["round"] for r in first["rounds"]] == [0, 1, 2]


async def test_code_run_selects_by_public_tests(tmp_path, grader):
    def reply(body):
        good = f"```python\n{SHORT_SORT}```"
        bad = "```python\nprint('NO')\n```"
        return good if body.get("seed", 1) % 3 == 0 else bad

    server = FaultServer(reply=reply)
    problems = load_lcb(DATASETS / "livecodebench")
    with serve_app(server.app()) as url:
        backend = OpenAIBackend(f"{url}/v1", model="m", retry=FAST)
        spec = EvalSpec("lcb", RSAConfig(population=6, k=2, rounds=1, budget=1000, tail=50, seed=1, task="code"))
        await Evaluation(spec, backend, problems, tmp_path, code_grader=grader).run()
    [record] = list(read_jsonl(tmp_path / "problems.jsonl"))
    last = record["population"]
    assert 0 < last["correct"] < 6, "the script mixes good and bad programs"
    assert last["majority"] and record["correct"], "the program passing the public test is chosen"


RUN_SCRIPT = """
import asyncio, sys
from pathlib import Path
from markov_rsa import RSAConfig
from markov_rsa.backends.openai import OpenAIBackend
from markov_rsa.evals.benchmarks import load_task
from markov_rsa.evals.runner import EvalSpec, Evaluation
url, out, data = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
backend = OpenAIBackend(url, model="m")
spec = EvalSpec("aime25", RSAConfig(population=3, k=2, rounds=1, budget=100, tail=20, seed=5), limit=8,
                concurrency=2)
asyncio.run(Evaluation(spec, backend, load_task("aime25", data), out).run())
"""


def test_resume_after_sigkill_loses_nothing_and_repeats_nothing(tmp_path):
    server = FaultServer(delay=0.15, reply=boxed_gold)
    with serve_app(server.app()) as url:
        args = [sys.executable, "-c", RUN_SCRIPT, f"{url}/v1", str(tmp_path), str(DATASETS)]
        first = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        problems_file = tmp_path / "problems.jsonl"
        deadline = time.monotonic() + 60
        while len(list(read_jsonl(problems_file))) < 3:
            assert time.monotonic() < deadline and first.poll() is None
            time.sleep(0.05)
        first.send_signal(signal.SIGKILL)
        first.wait()
        done_before = {r["problem_id"] for r in read_jsonl(problems_file)}
        assert 3 <= len(done_before) < 8
        prompts_before = len(server.bodies)
        subprocess.run(args, check=True, timeout=120, capture_output=True)
        second_prompts = [json.dumps(b) for b in server.bodies[prompts_before:]]
    records = list(read_jsonl(problems_file))
    assert sorted(r["problem_id"] for r in records) == sorted({r["problem_id"] for r in records}), "no duplicates"
    assert len(records) == 8
    problems = {p.id: p.problem for p in load_task("aime25", DATASETS)}
    for pid in done_before:
        assert not any(json.dumps(problems[pid])[1:-20] in body for body in second_prompts), f"{pid} redone"
    attempts = {r["attempt"] for r in records}
    kept = [c for c in read_jsonl(tmp_path / "candidates.jsonl") if c["attempt"] in attempts]
    assert len(kept) == 8 * 3 * 2, "every finished problem keeps all its candidates"


def test_eval_stops_at_once_when_the_endpoint_refuses_every_request(tmp_path):
    server = FaultServer(faults=lambda body: ["401"] * 10)
    with serve_app(server.app()) as url:
        out = subprocess.run(
            [sys.executable, "-m", "markov_rsa.cli.app", "eval", "aime25", "--out", str(tmp_path), "--data-dir",
             str(DATASETS), "--base-url", f"{url}/v1", "--model", "m", "--limit", "5", "--population", "2",
             "--k", "1", "--rounds", "0", "--budget", "50", "--tail", "10"],
            capture_output=True, text=True, timeout=120,
        )
    assert out.returncode == 2 and "rejected the API key" in out.stderr and "Traceback" not in out.stderr
    assert list(read_jsonl(tmp_path / "problems.jsonl")) == []


class Named:
    """A backend that is only named (resume checks read its info; nothing is generated)."""

    def __init__(self, kind: str = "openai", model: str = "m") -> None:
        from markov_rsa.backends.base import BackendInfo

        self.info = BackendInfo(kind=kind, model=model)


def _edited(item, **changes):
    import dataclasses

    return dataclasses.replace(item, **changes)


@pytest.mark.parametrize(("change", "named"), [
    ({"model": "other-model"}, "model"),
    ({"kind": "transformers"}, "backend"),
    ({"config": RSAConfig(budget=300, tail=20)}, "RSA settings (budget)"),
    ({"config": RSAConfig(prompt_version="1")}, "RSA settings (prompt_version)"),
    ({"version": "0.0.1"}, "markov-rsa version"),
    # What the data was: its selection, its content (a checksum of every planned problem), the plan.
    ({"data": {"release": "v5"}}, "data (release)"),
    ({"data": {"since": "2024-01-01"}}, "data (since)"),
    ({"problems": lambda ps: [_edited(ps[0], answer="71")]}, "data (sha256)"),
    ({"problems": lambda ps: [_edited(ps[0], problem=ps[0].problem + " ")]}, "data (sha256)"),
    ({"data": {"data_dir": None}}, "data (source)"),
    ({"problems": lambda ps: load_task("aime25", DATASETS)[:2]}, "problem set"),
])
def test_resume_refuses_a_directory_of_another_run_and_says_what_differs(tmp_path, monkeypatch, change, named):
    import markov_rsa.evals.runner as runner

    problems = load_task("aime25", DATASETS)[:1]
    data = {"data_dir": str(DATASETS)}
    spec = EvalSpec("aime25", RSAConfig(), data=data)
    Evaluation(spec, Named(), problems, tmp_path, math_grader=object())._prepare()  # type: ignore[arg-type]
    assert json.loads((tmp_path / "run.json").read_text())["format"] == 3
    if "version" in change:
        monkeypatch.setattr(runner, "__version__", change["version"])
    backend = Named(change.get("kind", "openai"), change.get("model", "m"))
    again = EvalSpec("aime25", change.get("config", RSAConfig()), data={**data, **change.get("data", {})})
    mine = change["problems"](problems) if "problems" in change else problems
    with pytest.raises(ConfigError, match=re.escape(f"another {named}")):
        Evaluation(again, backend, mine, tmp_path, math_grader=object())._prepare()  # type: ignore[arg-type]
    forced = dataclasses.replace(again, force=True)
    Evaluation(forced, backend, mine, tmp_path, math_grader=object())._prepare()  # type: ignore[arg-type]


def test_resume_refuses_another_isolation(tmp_path):
    """A sandboxed code run resumed with --unsafe-no-sandbox would be graded unsandboxed under a run.json
    that says bwrap: refused, as is the converse."""
    problems = load_lcb(DATASETS / "livecodebench")
    config = RSAConfig(task="code")
    Evaluation(EvalSpec("lcb", config), Named(), problems, tmp_path, code_grader=object())._prepare()  # type: ignore[arg-type]
    assert json.loads((tmp_path / "run.json").read_text())["isolation"] == "bwrap"
    unsafe = EvalSpec("lcb", config, isolation="rlimits")
    with pytest.raises(ConfigError, match=re.escape("another isolation: 'bwrap', this run 'rlimits'")):
        Evaluation(unsafe, Named(), problems, tmp_path, code_grader=object())._prepare()  # type: ignore[arg-type]


def test_two_writers_on_one_directory_are_refused(tmp_path):
    from markov_rsa.evals.log import locked

    with locked(tmp_path):
        held = subprocess.run([sys.executable, "-c", "import sys; from pathlib import Path; "
                               "from markov_rsa.evals.log import locked\nwith locked(Path(sys.argv[1])): pass",
                               str(tmp_path)], capture_output=True, text=True, timeout=60)
        assert held.returncode != 0 and "is being written by another rsa eval" in held.stderr
    with locked(tmp_path):
        pass  # released when the holder ends


async def test_duplicate_and_torn_records_neither_count_twice_nor_crash(tmp_path, math_grader):
    from markov_rsa.evals.log import read_candidates, read_problems
    from markov_rsa.evals.report import load_run, results_table

    server = FaultServer(reply=boxed_gold)
    with serve_app(server.app()) as url:
        backend = OpenAIBackend(f"{url}/v1", model="m", retry=FAST)
        spec = EvalSpec("aime25", RSAConfig(population=2, k=2, rounds=0, budget=50, tail=10, seed=1), limit=2)
        await Evaluation(spec, backend, load_task("aime25", DATASETS), tmp_path, math_grader=math_grader).run()
        problems_file, candidates_file = tmp_path / "problems.jsonl", tmp_path / "candidates.jsonl"
        first_line = problems_file.read_bytes().splitlines(keepends=True)[0]
        torn = json.dumps({"problem_id": "x", "answer": "é" * 10}).encode()[:-15]  # cut inside a character
        with problems_file.open("ab") as handle:
            handle.write(first_line + torn)
        with candidates_file.open("ab") as handle:
            handle.write(candidates_file.read_bytes().splitlines(keepends=True)[0] + b"\xc3")
        assert len(read_problems(problems_file)) == 2
        assert len(read_candidates(candidates_file)) == 4
        run = load_run(tmp_path)
        assert run.summary.problems == 2 and results_table([run])[1][4] == "2"
        await Evaluation(spec, backend, load_task("aime25", DATASETS), tmp_path, math_grader=math_grader).run()
    assert len(read_problems(problems_file)) == 2, "resume reads the same file and redoes nothing"


async def test_a_finished_run_leaves_no_grader_processes(tmp_path):
    import psutil

    before = {p.pid for p in psutil.Process().children(recursive=True)}
    server = FaultServer(reply=boxed_gold)
    with serve_app(server.app()) as url:
        backend = OpenAIBackend(f"{url}/v1", model="m", retry=FAST)
        spec = EvalSpec("aime25", RSAConfig(population=2, k=2, rounds=0, budget=50, tail=10, seed=1), limit=2)
        await Evaluation(spec, backend, load_task("aime25", DATASETS), tmp_path).run()
    left = [p for p in psutil.Process().children(recursive=True) if p.pid not in before and p.is_running()
            and p.status() != psutil.STATUS_ZOMBIE]
    assert left == [], "the math grader's workers end with the run"


def slow_or_grade(prediction: str, gold: str, integer: bool) -> bool:
    """A grading function whose 'slow' answers never finish (runs in the grader's worker processes)."""
    if prediction == "slow":
        time.sleep(120)
    from markov_rsa.evals.grading.math import grade_one

    return grade_one(prediction, gold, integer)


async def test_slow_answers_cost_only_themselves_under_load():
    """4 slow wrong answers graded beside 12 correct ones: each deadline starts when its item starts, and a
    timeout ends only its own worker, so all 12 correct answers grade correct."""
    items = [("slow", "70", True)] * 4 + [("70", "70", True)] * 6 + [("\\frac12", "0.5", False)] * 6
    with MathGrader(workers=2, timeout=2.0, grade_fn=slow_or_grade) as grader:
        results = await grader.grade_many(items)
    assert results[:4] == [False] * 4
    assert results[4:] == [True] * 12


def test_private_test_decoder_caps_decompressed_size():
    from markov_rsa.evals import datasets

    bomb = base64.b64encode(zlib.compress(b"\x00" * (8 * 2**20), 9)).decode()
    original = datasets.MAX_PRIVATE_TESTS_BYTES
    datasets.MAX_PRIVATE_TESTS_BYTES = 2**20
    try:
        with pytest.raises(ConfigError, match="decompress to more than"):
            decode_private_tests(bomb)
    finally:
        datasets.MAX_PRIVATE_TESTS_BYTES = original


def test_rsa_eval_and_report_end_to_end_on_the_embedded_model(tmp_path, demo_dir):
    run = subprocess.run(
        [sys.executable, "-m", "markov_rsa.cli.app", "eval", "aime25", "--out", str(tmp_path / "run"),
         "--data-dir", str(DATASETS), "--limit", "2", "--population", "2", "--k", "2", "--rounds", "1",
         "--budget", "16", "--tail", "8", "--seed", "0"],
        capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stderr
    assert "avg@N" in run.stderr
    assert len(list(read_jsonl(tmp_path / "run" / "problems.jsonl"))) == 2
    again = subprocess.run(
        [sys.executable, "-m", "markov_rsa.cli.app", "eval", "aime25", "--out", str(tmp_path / "run"),
         "--data-dir", str(DATASETS), "--limit", "2", "--population", "2", "--k", "2", "--rounds", "1",
         "--budget", "16", "--tail", "8", "--seed", "0"],
        capture_output=True, text=True, timeout=600,
    )
    assert again.returncode == 0 and "2 resumed" in again.stderr
    report = subprocess.run(
        [sys.executable, "-m", "markov_rsa.cli.app", "report", str(tmp_path / "run"), "--out", str(tmp_path / "rep")],
        capture_output=True, text=True, timeout=120,
    )
    assert report.returncode == 0, report.stderr
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "| aime25 | demo, modified (N2 K2 T1 β16 τ8" in md and "MathArena" in md, "overrides are not the preset"
    page = (tmp_path / "rep" / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 3, "two plots and the per-problem heatmap"
    assert (tmp_path / "rep" / "samples-run.html").is_file(), "the per-sample view"
    assert (tmp_path / "rep" / "accuracy_per_round.png").stat().st_size > 1000


def test_report_on_a_non_run_directory_is_a_one_line_error(tmp_path):
    out = subprocess.run([sys.executable, "-m", "markov_rsa.cli.app", "report", str(tmp_path)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "is not a run directory" in out.stderr and "Traceback" not in out.stderr


def hub_cache(root: Path, repo_id: str, files: dict[str, bytes]) -> None:
    """A Hugging Face Hub cache holding one snapshot of a dataset repository, as a download leaves it."""
    revision = "0" * 40
    repo = root / f"datasets--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    for name, data in files.items():
        path = repo / "snapshots" / revision / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


LOAD_FROM_HUB = """
import json, sys
from markov_rsa.evals.benchmarks import load_task
print(json.dumps({name: [(p.id, p.answer, p.meta.get("revision")) for p in load_task(*args, **kw)]
                  for name, args, kw in json.loads(sys.argv[1])}))
"""


def test_sets_load_from_the_hub_cache_as_users_get_them(tmp_path):
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    pq.write_table(pa.table({"problem_idx": [1, 2], "problem": ["Find x.", "Find y."], "answer": [70, 588]}), buffer)
    hub_cache(tmp_path, "MathArena/aime_2025", {"data/train-00000-of-00001.parquet": buffer.getvalue()})
    row = json.loads((DATASETS / "livecodebench" / "code_generation_lite_1873_A.jsonl").read_text())
    newer = {**leetcode_row(TWO_SUM_TESTS), "question_id": "2", "contest_date": "2024-02-01T00:00:00"}
    hub_cache(tmp_path, "livecodebench/code_generation_lite",
              {"test.jsonl": (json.dumps(row) + "\n").encode(), "test2.jsonl": (json.dumps(newer) + "\n").encode()})
    calls = [["aime25", ["aime25"], {}], ["v1", ["lcb"], {"release": "v1"}], ["v2", ["lcb"], {"release": "v2"}],
             ["since", ["lcb"], {"release": "v2", "since": "2024-01-01"}]]
    # huggingface_hub reads its settings at import, so the load runs in a fresh process as a user's would.
    env = {k: v for k, v in os.environ.items() if k != "MARKOV_RSA_DATA_DIR"}
    env.update(HF_HUB_CACHE=str(tmp_path), HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", LOAD_FROM_HUB, json.dumps(calls)], capture_output=True, text=True,
                         env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    loaded = json.loads(out.stdout)
    assert loaded["aime25"] == [["aime25_1", "70", "0" * 40], ["aime25_2", "588", "0" * 40]], \
        "the Hub commit the set was read at is recorded"
    assert [i for i, *_ in loaded["v1"]] == ["1873_A"]
    assert [i for i, *_ in loaded["v2"]] == ["1873_A", "2"]
    assert [i for i, *_ in loaded["since"]] == ["2"]
