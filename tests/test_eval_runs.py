"""A run directory holds one run, the data is what it says, labels say what ran, and the command
fails with one line: symlinks, unwritable --out, malformed and duplicated data, date filters, names,
Ctrl-C.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from markov_rsa import ConfigError, RSAConfig
from markov_rsa.evals.benchmarks import load_task
from markov_rsa.evals.datasets import load_lcb
from markov_rsa.evals.log import read_jsonl
from markov_rsa.evals.report import load_run, method_label, write_report
from markov_rsa.evals.runner import EvalSpec, Evaluation
from tests.conftest import DATASETS
from tests.doubles import ScriptedBackend
from tests.servers import FaultServer, serve_app
from tests.test_eval_numbers import ExactGrader, problems

LCB_ROW = json.loads((DATASETS / "livecodebench" / "code_generation_lite_1873_A.jsonl").read_text())
SMALL = RSAConfig(population=2, k=2, rounds=0, budget=40, tail=10, seed=1)


def right(request, number):
    return "ok \\boxed{70}"


def run_eval(out: Path, spec: EvalSpec | None = None, count: int = 2, concurrency: int = 4) -> None:
    spec = spec or EvalSpec("aime25", SMALL, concurrency=concurrency)
    evaluation = Evaluation(spec, ScriptedBackend(right), problems(count), out, math_grader=ExactGrader())  # type: ignore[arg-type]
    asyncio.run(evaluation.run())


def rsa(*args: str, timeout: float = 120, **kwargs) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "markov_rsa.cli.app", *args], capture_output=True, text=True,
                          timeout=timeout, **kwargs)


def one_line_error(out: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
    for needle in needles:
        assert needle in out.stderr, out.stderr


# -- #7 filters parse dates; a filter that cannot apply is an error; rows fail in one line ------------------
def test_since_and_until_compare_dates_not_strings(tmp_path):
    rows = [{**LCB_ROW, "question_id": "march", "contest_date": "2024-03-01T00:00:00"},
            {**LCB_ROW, "question_id": "jan", "contest_date": "2024-01-04T00:00:00"}]
    (tmp_path / "mine.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [p.id for p in load_lcb(tmp_path, since="2024-1-5")] == ["march"]
    assert [p.id for p in load_lcb(tmp_path, until="2024-1-4")] == ["jan"]
    with pytest.raises(ConfigError, match="since: '2024-13-01' is not a date"):
        load_lcb(tmp_path, since="2024-13-01")


def test_filters_that_cannot_apply_are_errors(tmp_path):
    with pytest.raises(ConfigError, match="--since applies to LiveCodeBench"):
        load_task("aime25", DATASETS, since="2024-01-01")
    with pytest.raises(ConfigError, match="--release applies to LiveCodeBench"):
        load_task("aime25", DATASETS, release="v2")
    (tmp_path / "mine.jsonl").write_text(json.dumps(LCB_ROW) + "\n")
    with pytest.raises(ConfigError, match="not in the Hub's layout"):
        load_lcb(tmp_path, release="v2")
    (tmp_path / "mine.jsonl").write_text(json.dumps({**LCB_ROW, "contest_date": None}) + "\n")
    with pytest.raises(ConfigError, match=r"mine\.jsonl:1: no contest_date"):
        load_lcb(tmp_path, since="2024-01-01")


@pytest.mark.parametrize(("row", "needle"), [
    ({"problem": "no answer"}, "aime_2025.jsonl:2: the row has no 'answer' field"),
    ({"answer": "1"}, "aime_2025.jsonl:2: the row has no 'problem' field"),
])
def test_malformed_math_rows_are_one_line_naming_row_and_field(tmp_path, row, needle):
    good = {"id": "a1", "problem": "p", "answer": "1"}
    (tmp_path / "aime_2025.jsonl").write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
    out = rsa("eval", "aime25", "--data-dir", str(tmp_path), "--out", str(tmp_path / "run"))
    one_line_error(out, needle)


@pytest.mark.parametrize(("change", "needle"), [
    ({"public_test_cases": "[{\"input\": 1"}, "mine.jsonl:1: field 'public_test_cases' is malformed"),
    ({"private_test_cases": "not base64 at all!"}, "mine.jsonl:1: field 'private_test_cases' is malformed"),
    ({"metadata": "{]"}, "mine.jsonl:1: field 'metadata' is malformed"),
    ({"question_id": None}, "mine.jsonl:1: the row has no 'question_id' field"),
])
def test_malformed_lcb_rows_are_one_line_naming_row_and_field(tmp_path, change, needle):
    (tmp_path / "mine.jsonl").write_text(json.dumps({**LCB_ROW, **change}) + "\n")
    out = rsa("eval", "lcb", "--data-dir", str(tmp_path), "--out", str(tmp_path / "run"), "--unsafe-no-sandbox")
    one_line_error(out, needle)


def test_duplicate_ids_are_refused_at_load_naming_them(tmp_path):
    rows = [{"id": f"aime_I_{i}", "problem": "p", "answer": "1"} for i in (1, 2, 3)]
    rows += [{"id": f"aime_I_{i}", "problem": "q", "answer": "2"} for i in (2, 3)]
    (tmp_path / "aime_2026.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ConfigError, match="duplicate problem ids: aime_I_2, aime_I_3"):
        load_task("aime26", tmp_path)
    (tmp_path / "lcb").mkdir()
    (tmp_path / "lcb" / "mine.jsonl").write_text(json.dumps(LCB_ROW) + "\n" + json.dumps(LCB_ROW) + "\n")
    with pytest.raises(ConfigError, match="duplicate problem ids: 1873_A"):
        load_lcb(tmp_path / "lcb")


# -- #22.7 a run directory's files are never followed through links --------------------------------------------
@pytest.mark.parametrize("name", ["run.lock", "candidates.jsonl", "problems.jsonl", "run.json"])
def test_a_symlink_in_the_run_directory_is_refused_and_its_target_untouched(tmp_path, name):
    out = tmp_path / "run"
    if name != "run.json":
        run_eval(out)  # a finished run, then a link planted before the resume
    else:
        out.mkdir()
    target = tmp_path / "precious.txt"
    target.write_text("keep me\n")
    (out / name).unlink(missing_ok=True)
    (out / name).symlink_to(target)
    with pytest.raises(ConfigError, match="is a symbolic link"):
        run_eval(out)
    assert target.read_text() == "keep me\n"


# -- #22.7 an --out that cannot be written: one line, exit 2, nothing lost -------------------------------------
def test_out_that_is_a_file_is_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    out = rsa("eval", "aime25", "--data-dir", str(DATASETS), "--out", str(tmp_path / "file"), "--limit", "1",
              "--base-url", "http://127.0.0.1:9/v1", "--model", "m")
    one_line_error(out, "out:", "is not a directory")
    assert (tmp_path / "file").read_text() == "x"


def test_a_full_disk_stops_the_run_with_one_error_and_keeps_what_was_written(tmp_path, monkeypatch):
    import errno

    import markov_rsa.evals.log as log

    out = tmp_path / "run"
    original = log.JsonlWriter._put
    room = {"records": 2}

    def filling(self, text):
        if self.path.name == "problems.jsonl":
            if room["records"] == 0:
                raise log.out_error(self.path, OSError(errno.ENOSPC, "No space left on device"))
            room["records"] -= 1
        return original(self, text)

    monkeypatch.setattr(log.JsonlWriter, "_put", filling)
    with pytest.raises(ConfigError, match="the disk is full; finished problems are kept"):
        run_eval(out, count=4, concurrency=1)
    kept = list(read_jsonl(out / "problems.jsonl"))
    assert len(kept) == 2 and all(not r["error"] for r in kept)
    monkeypatch.setattr(log.JsonlWriter, "_put", original)
    run_eval(out, count=4)  # space again: the same command resumes
    records = list(read_jsonl(out / "problems.jsonl"))
    assert len(records) == 4 and records[:2] == kept


def test_full_and_read_only_out_through_the_cli(tmp_path):
    """A real tmpfs that fills up and a real read-only mount (in a private mount namespace)."""
    if subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode != 0:
        pytest.fail("unshare -rm must work here (make test relies on user namespaces, as bubblewrap does)")
    server = FaultServer(reply=lambda body: "Thinking. " * 300 + "\\boxed{70}")
    mount = tmp_path / "mnt"
    mount.mkdir()
    with serve_app(server.app()) as url:
        base = [sys.executable, "-m", "markov_rsa.cli.app", "eval", "aime25", "--data-dir", str(DATASETS),
                "--base-url", f"{url}/v1", "--model", "m", "--population", "2", "--k", "2", "--rounds", "0",
                "--budget", "4000", "--tail", "10", "--seed", "1", "--out", str(mount / "run")]
        script = (f"mount -t tmpfs -o size=40k tmpfs {mount} && {' '.join(base)} --limit 30; echo rc=$?; "
                  f"ls {mount}/run; wc -l < {mount}/run/problems.jsonl")
        full = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=300,
                              env={**os.environ, "PYTHONPATH": os.getcwd()})
        assert "rc=2" in full.stdout, full.stdout + full.stderr
        assert "the disk is full" in full.stderr and "Traceback" not in full.stderr, full.stderr
        script = f"mount -t tmpfs -o ro tmpfs {mount} && {' '.join(base)} --limit 1; echo rc=$?"
        ro = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert "rc=2" in ro.stdout, ro.stdout + ro.stderr
    assert "read-only" in ro.stderr and "Traceback" not in ro.stderr, ro.stderr


# -- #6 labels say what ran; names are unique and can be changed ---------------------------------------------
def test_labels_say_what_ran():
    preset = RSAConfig.from_preset("zaya-16k")
    assert method_label(preset.to_dict()).startswith("zaya-16k (N16 K4 T2")
    changed = method_label(RSAConfig.from_preset("zaya-16k", population=4, k=2, rounds=1).to_dict())
    assert not changed.startswith("zaya-16k (") and "N4 K2 T1" in changed
    plain = method_label(SMALL.to_dict())
    other = method_label(SMALL.replace(final="aggregate", final_n=3, temperature=0.6, prompt_version="1").to_dict())
    assert plain != other
    assert all(f in other for f in ("final=aggregate", "final_n=3", "temperature=0.6", "prompt_version=1"))


def test_duplicate_names_are_refused_and_a_name_given_on_resume_is_kept(tmp_path):
    run_eval(tmp_path / "a", EvalSpec("aime25", SMALL, name="same"))
    run_eval(tmp_path / "b", EvalSpec("aime25", SMALL.replace(seed=2), name="same"))
    with pytest.raises(ConfigError, match="two runs are named 'same'"):
        write_report([tmp_path / "a", tmp_path / "b"], tmp_path / "report")
    run_eval(tmp_path / "b", EvalSpec("aime25", SMALL.replace(seed=2), name="other"))
    assert load_run(tmp_path / "b").name == "other"
    write_report([tmp_path / "a", tmp_path / "b"], tmp_path / "report")


def test_a_run_without_seed_records_the_seed_it_drew_and_resumes_with_it(tmp_path):
    run_eval(tmp_path, EvalSpec("aime25", SMALL.replace(seed=None)), count=1)
    meta = json.loads((tmp_path / "run.json").read_text())
    assert isinstance(meta["config"]["seed"], int) and meta["seed_drawn"] is True
    run_eval(tmp_path, EvalSpec("aime25", SMALL.replace(seed=None)), count=1)  # resumes: the drawn seed is reused


# -- #8 Ctrl-C ----------------------------------------------------------------------------------------
def test_ctrl_c_is_one_line_that_says_how_to_resume(tmp_path):
    server = FaultServer(delay=0.3, reply=lambda body: "\\boxed{70}")
    with serve_app(server.app()) as url:
        proc = subprocess.Popen(
            [sys.executable, "-m", "markov_rsa.cli.app", "eval", "aime25", "--data-dir", str(DATASETS),
             "--base-url", f"{url}/v1", "--model", "m", "--population", "2", "--k", "2", "--rounds", "1",
             "--budget", "40", "--tail", "10", "--seed", "1", "--out", str(tmp_path / "run"), "--limit", "30"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        deadline = time.monotonic() + 90
        while len(list(read_jsonl(tmp_path / "run" / "problems.jsonl"))) < 3:  # the graders are up
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.1)
        time.sleep(2)  # grading workers past their start-up (a worker still importing cannot ignore SIGINT yet)
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal sends: the whole process group
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert "run the same command again to resume" in err


# -- #14 progress where people watch it -------------------------------------------------------------
def test_progress_lines_when_stderr_is_not_a_terminal(tmp_path):
    import re

    server = FaultServer(delay=0.25, reply=lambda body: "\\boxed{70}")
    with serve_app(server.app()) as url:
        out = rsa("eval", "aime25", "--data-dir", str(DATASETS), "--base-url", f"{url}/v1", "--model", "m",
                  "--population", "2", "--k", "2", "--rounds", "1", "--budget", "40", "--tail", "10", "--seed", "1",
                  "--out", str(tmp_path / "run"), "--limit", "4", "--concurrency", "1", "--progress-every", "0.3")
    assert out.returncode == 0, out.stderr
    lines = [line for line in out.stderr.splitlines() if re.match(r"aime25: \d/4 done, [\d.]+ problems/min, ", line)]
    assert len(lines) >= 2, out.stderr
    assert lines[-1].startswith("aime25: 4/4 done") and "0.0 min left" in lines[-1]
    assert "\x1b[" not in out.stderr and "━" not in out.stderr, "no bar redraws in a log"
