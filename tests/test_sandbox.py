"""The code sandbox under attack: every hostile program fails, sees nothing, changes nothing outside.

The programs get past the interpreter guard on purpose (``import posix``, ``_socket``), so these tests
exercise the real boundary (bubblewrap, a uid of the program's own, limits), not the guard.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from markov_rsa.evals.datasets import lcb_problem, load_lcb
from markov_rsa.evals.grading import sandbox as sandbox_module
from markov_rsa.evals.grading.code import CodeGrader
from markov_rsa.evals.grading.sandbox import Sandbox, SandboxLimits, SandboxUnavailableError
from tests.conftest import DATASETS, ROOT
from tests.servers import FaultServer, serve_app

SHORT_SORT = """t = int(input())
for _ in range(t):
    s = input().strip()
    print("YES" if sum(a != b for a, b in zip(s, "abc")) in (0, 2) else "NO")
"""
SECRET = "sk-harness-secret-4242"


@pytest.fixture(scope="module")
def sandbox() -> Sandbox:
    return Sandbox(SandboxLimits(wall_seconds=6, cpu_seconds=4, disk_mb=16))


@pytest.fixture(scope="module")
def problem():
    [p] = load_lcb(DATASETS / "livecodebench")
    return p.__class__(**{**p.__dict__, "public_tests": (), "private_tests": p.private_tests[:1]})


LEASED: set[int] = set()


@pytest.fixture(autouse=True)
def record_leased_uids(monkeypatch):
    """Every uid these tests' sandboxes lease (other programs on the machine may use sandbox uids too)."""
    real = sandbox_module.lease_uid

    def recording(*args, **kwargs):
        lease = real(*args, **kwargs)
        LEASED.add(lease.uid)
        return lease

    monkeypatch.setattr(sandbox_module, "lease_uid", recording)


def sandbox_processes(uids: set[int] | None = None) -> list[int]:
    """Processes running as a uid these tests leased (zombies run nothing)."""
    uids = LEASED if uids is None else uids
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                if entry.stat().st_uid in uids and not stat[stat.rindex(")") + 2:].startswith("Z"):
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


HOSTILE = {
    "replaces its output with a FIFO": "import posix\nposix.mkfifo('stdout.txt')\nposix.mkfifo('stderr.txt')\n",
    "symlinks its output to /dev/zero": "import posix\nposix.symlink('/dev/zero', 'stdout.txt')\n",
    "symlinks its output to a host file": "import posix\nposix.symlink('/etc/passwd', 'stdout.txt')\n",
    "fills /dev/shm": "open('/dev/shm/fill', 'wb').write(b'x' * 200 * 2**20)\n",
    "fills its disk": "f = open('/scratch/fill', 'wb')\nfor _ in range(200):\n    f.write(b'x' * 2**20)\n",
    "fork bomb as root": ("import posix\nwhile True:\n    try:\n        posix.fork()\n"
                          "    except OSError:\n        pass\n"),
    "setsid daemons": ("import posix, time\nfor _ in range(3):\n    if posix.fork() == 0:\n        posix.setsid()\n"
                       "        time.sleep(120)\n"),
    "kills its parent": "import posix, signal\nposix.kill(posix.getppid(), signal.SIGKILL)\nposix.kill(1, 9)\n",
    "writes outside": ("open('/tmp/markov-rsa-escape', 'w').write('x')\n"
                       "open('/root/markov-rsa-escape', 'w').write('x')\n"),
    "memory bomb": "x = [bytearray(10**8) for _ in range(1000)]\n",
    "sleeps": "import time\ntime.sleep(60)\n",
}


@pytest.mark.parametrize("name", HOSTILE)
async def test_hostile_program_fails_and_the_harness_survives(sandbox, problem, name):
    grader = CodeGrader(sandbox)
    source = HOSTILE[name] + "print('MAYBE')\n"  # never the expected output
    started = time.perf_counter()
    assert not await grader.grade(source, problem)
    assert time.perf_counter() - started < 20
    assert not Path("/tmp/markov-rsa-escape").exists() and not Path("/root/markov-rsa-escape").exists()
    assert not Path("/dev/shm/fill").exists()
    assert sandbox_processes() == [], "nothing the program started outlives its test"
    assert await grader.grade(SHORT_SORT, problem), "the harness still works afterwards"


def run(sandbox: Sandbox, source: str):
    return sandbox.run(source, "")


def test_it_sees_nothing_of_the_host(sandbox):
    probe = """
import os
for path in ('/root', '/home', '/etc/shadow', '/etc/passwd', ROOT, DATA, '/tmp/markov-rsa-host-file'):
    print(path, os.path.exists(path))
print('tmp', os.listdir('/tmp'), 'uid', os.getuid())
""".replace("ROOT", repr(str(ROOT))).replace("DATA", repr(str(DATASETS)))
    Path("/tmp/markov-rsa-host-file").write_text("host")
    try:
        outcome = run(sandbox, probe)
    finally:
        Path("/tmp/markov-rsa-host-file").unlink()
    assert outcome.status == "ok", outcome.stderr
    assert "True" not in outcome.stdout, outcome.stdout
    assert "tmp [] uid 65534" in outcome.stdout


def test_it_cannot_read_the_datasets_private_tests(sandbox):
    path = next((DATASETS / "livecodebench").glob("*.jsonl"))
    outcome = run(sandbox, f"print(open({str(path)!r}).read()[:200])")
    assert outcome.status == "error" and outcome.stdout == ""


def test_it_cannot_read_the_harness_environment(sandbox, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    probe = """
import os
for pid in os.listdir('/proc'):
    if pid.isdigit():
        try:
            print(open(f'/proc/{pid}/environ', 'rb').read())
        except OSError:
            pass
print(os.environ)
"""
    outcome = run(sandbox, probe)
    assert outcome.status == "ok" and SECRET not in outcome.stdout
    assert str(os.getpid()) not in outcome.stdout.split(), "host processes are not visible"


def test_it_has_no_network(sandbox):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        program = f"import _socket\ns = _socket.socket()\ns.settimeout(2)\ns.connect(('127.0.0.1', {port}))\n"
        outcome = run(sandbox, program + "print('connected')")
    assert "connected" not in outcome.stdout and outcome.status == "error"


def test_output_is_capped_and_read_from_descriptors(sandbox):
    limited = Sandbox(SandboxLimits(output_bytes=4096, wall_seconds=6))
    outcome = run(limited, "import sys\nwhile True:\n    sys.stdout.write('x' * 1000)\n")
    assert outcome.status == "output_limit" and len(outcome.stdout) <= 4096


async def test_call_based_prints_are_discarded_as_livecodebench_does(sandbox):
    """LiveCodeBench captures what a call-based solution prints and compares only the return value,
    so a correct solution that prints is correct; a wrong one that prints the right answer is not."""
    tests = [{"input": "[2, 7, 11, 15]\n9", "output": "[0, 1]", "testtype": "functional"}]
    row = {"question_title": "two sum", "question_content": "...", "platform": "leetcode", "question_id": "1",
           "contest_id": "w1", "contest_date": "2024-01-01T00:00:00", "starter_code": "class Solution:\n",
           "difficulty": "easy", "public_test_cases": __import__("json").dumps(tests), "private_test_cases": "[]",
           "metadata": '{"func_name": "twoSum"}'}
    problem = lcb_problem(row)
    grader = CodeGrader(sandbox)
    chatty = ("class Solution:\n    def twoSum(self, nums, target):\n        print('debug', nums)\n"
              "        seen = {}\n        for i, x in enumerate(nums):\n            if target - x in seen:\n"
              "                return [seen[target - x], i]\n            seen[x] = i\n")
    assert await grader.grade(chatty, problem)
    cheat = "class Solution:\n    def twoSum(self, nums, target):\n        print([0, 1])\n        return None\n"
    assert not await grader.grade(cheat, problem)


def test_without_bubblewrap_the_sandbox_refuses_to_run(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(SandboxUnavailableError, match="bubblewrap"):
        Sandbox()
    assert Sandbox(isolation="rlimits").run("print(1)", "").stdout == "1\n", "the explicit opt-out still runs"


def test_rsa_eval_lcb_refuses_without_bubblewrap_before_any_generation(tmp_path):
    server = FaultServer()
    with serve_app(server.app()) as url:
        command = [sys.executable, "-c", "from markov_rsa.cli.app import main; main()", "eval", "lcb",
                   "--data-dir", str(DATASETS), "--out", str(tmp_path / "run"), "--base-url", f"{url}/v1",
                   "--model", "fault-model", "--preset", "parallel", "--population", "1"]
        out = subprocess.run(command, capture_output=True, text=True, timeout=120,
                             env={**os.environ, "PATH": "/nonexistent"})
    assert out.returncode == 2, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "bubblewrap" in lines[0] and "--unsafe-no-sandbox" in lines[0]
    assert "Traceback" not in out.stderr and not server.bodies, "refused before any request"
