"""The code grader against programs written to break it: each gets a verdict, the grader stays healthy.

Every hostile program is graded through ``CodeGrader.run_test`` (the path ``rsa eval`` takes) and each
case asserts the verdict, the grader's own health (its memory stays bounded, its event loop keeps
turning, the run ends in bounded time) and that nothing is left behind (no process under the uids it
used, no code directory, no open descriptor). Attacks are written so that, were they to succeed, the
program would print the right answer: a wrong verdict proves the attack failed. The programs get past
the interpreter guard on purpose (``posix``, ``ctypes`` re-imported), so the real boundary is tested.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from markov_rsa.evals.datasets import CodeTest, lcb_problem
from markov_rsa.evals.grading import sandbox as sandbox_module
from markov_rsa.evals.grading.code import CodeGrader, functional_matches, stdin_matches
from markov_rsa.evals.grading.sandbox import CODE_DIR_PREFIX, Sandbox, SandboxLimits, remove_stale_code_dirs
from markov_rsa.evals.grading.seccomp import CLONE_NAMESPACES, DENIED, DENIED_IOCTLS, describe
from markov_rsa.evals.grading.uids import lease_uid
from tests.conftest import DATASETS, ROOT
from tests.servers import FaultServer, serve_app

SUM = CodeTest(input="1 2\n", output="3\n", testtype="stdin")
TWO_SUM = CodeTest(input="[2, 7, 11, 15]\n9", output="[0, 1]", testtype="functional")
CTYPES = ("import sys\nfor _m in ('ctypes', '_ctypes'):\n    sys.modules.pop(_m, None)\n"
          "import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n")
RESULT = "import os, sys\nfd = int(sys.argv[4])\n"  # the call-based result channel, as a program finds it


def solution(body: str) -> str:
    """A call-based solution whose method runs ``body`` first."""
    lines = "".join(f"        {line}\n" for line in body.splitlines())
    return f"class Solution:\n    def twoSum(self, nums, target):\n{lines}        return [0, 1]\n"


@dataclass(frozen=True)
class Case:
    program: str
    verdict: str
    test: CodeTest = SUM


CASES = {
    # output the comparison must survive
    "sNaN where a number is expected": Case("print('sNaN')", "wrong answer"),
    "NaN and Infinity": Case("print('NaN Infinity')", "wrong answer"),
    "a 5000-digit number": Case("print('3' + '0' * 5000)", "wrong answer"),
    "a 5000-digit number equal to the answer": Case("print('0' * 5000 + '3')", "wrong answer"),
    "an 8 MiB numeric line": Case("import sys\nsys.stdout.write('3 ' * (3_900_000))", "wrong answer"),
    "8 MiB of lines": Case("import sys\nsys.stdout.write('3\\n' * 3_900_000)", "wrong answer"),
    "invalid UTF-8": Case("import sys\nsys.stdout.buffer.write(b'\\xff\\xfe3\\n')", "wrong answer"),
    "output past the cap": Case("import sys\nwhile True:\n    sys.stdout.write('3' * 65536)", "output_limit"),
    "200k nested [ as the result": Case(RESULT + "os.write(fd, b'[' * 200_000)\nos._exit(0)\n", "wrong answer",
                                        TWO_SUM),
    "a 5000-digit integer as the result": Case(RESULT + "os.write(fd, b'[' + b'9' * 5000 + b', 1]')\nos._exit(0)\n",
                                               "wrong answer", TWO_SUM),
    "8 MiB of objects as the result": Case(RESULT + "os.write(fd, b'[' + b'{}, ' * 2_000_000 + b'{}]')\n"
                                           "os._exit(0)\n", "wrong answer", TWO_SUM),
    "NaN as the result": Case(solution("return float('nan')"), "wrong answer", TWO_SUM),
    # verdicts come from the exit, not from stderr text
    "a correct program that says MemoryError": Case("import sys\nprint(3)\nprint('MemoryError', file=sys.stderr)",
                                                    "ok"),
    "a correct program that says File too large": Case("import sys\nprint(3)\n"
                                                       "print('OSError: File too large', file=sys.stderr)", "ok"),
    "a correct call-based program that says MemoryError": Case(solution("import sys\n"
                                                                        "print('MemoryError', file=sys.stderr)"),
                                                               "ok", TWO_SUM),
    # memory is bounded per program
    "four threads of 200 MB": Case("import threading\nkeep = []\n"
                                   "def grab():\n    keep.append(bytearray(200 * 2**20))\n"
                                   "ts = [threading.Thread(target=grab) for _ in range(4)]\n"
                                   "[t.start() for t in ts]\n[t.join() for t in ts]\nprint(3)", "memory"),
    "four children of 200 MB": Case("import posix, time\nkids = 0\nfor _ in range(4):\n"
                                    "    if posix.fork() == 0:\n        x = bytearray(200 * 2**20)\n"
                                    "        time.sleep(3)\n        posix._exit(0)\n    kids += 1\n"
                                    "print(3 if kids == 4 else 0)", "error"),
    "memory outside the address space (memfd)": Case("import posix\nfd = posix.memfd_create('x')\nprint(3)",
                                                     "error"),
    # the kernel surface
    "a user namespace with a nested root": Case(CTYPES + "if libc.unshare(0x10000000) == 0:\n    print(3)",
                                                "wrong answer"),
    "io_uring": Case(CTYPES + "p = ctypes.create_string_buffer(120)\n"
                     "if libc.syscall(425, 8, p) >= 0:\n    print(3)", "wrong answer"),
    "the kernel keyring": Case(CTYPES + "if libc.syscall(250, 0, -3, 1) >= 0:\n    print(3)", "wrong answer"),
    "ptrace on the sandbox's init": Case(CTYPES + "if libc.ptrace(16, 1, 0, 0) == 0:\n    print(3)",
                                         "wrong answer"),
    "an inet socket": Case("import _socket\ns = _socket.socket()\nprint(3)", "error"),
    "host paths in mountinfo": Case("text = open('/proc/self/mountinfo').read()\n"
                                    f"print(3 if any(p in text for p in ({str(ROOT)!r}, 'markov-rsa')) else 0)",
                                    "wrong answer"),
    "tool configuration in /usr/local/etc": Case("import os\n"
                                                 "print(3 if os.path.isdir('/usr/local/etc') and "
                                                 "os.listdir('/usr/local/etc') else 0)", "wrong answer"),
}


@pytest.fixture(scope="module")
def grader() -> CodeGrader:
    return CodeGrader(Sandbox(SandboxLimits(wall_seconds=8, cpu_seconds=5, memory_mb=512, disk_mb=16)))


@pytest.fixture
def leased(monkeypatch) -> set[int]:
    """The uids this test's runs lease (other programs on the machine may hold sandbox uids too)."""
    uids: set[int] = set()
    real = sandbox_module.lease_uid

    def recording(*args, **kwargs):
        lease = real(*args, **kwargs)
        uids.add(lease.uid)
        return lease

    monkeypatch.setattr(sandbox_module, "lease_uid", recording)
    return uids


def live_processes(uids: set[int]) -> list[int]:
    found = []
    for proc in psutil.process_iter(["uids", "status"]):
        try:
            if proc.info["uids"].real in uids and proc.info["status"] != psutil.STATUS_ZOMBIE:
                found.append(proc.pid)
        except (psutil.Error, TypeError):
            continue
    return found


def code_dirs() -> set[str]:
    return {p.name for p in Path(tempfile.gettempdir()).glob(f"{CODE_DIR_PREFIX}*")}


class Health:
    """The grader's peak memory over a block (sampled), and the longest stall of its event loop."""

    def __init__(self) -> None:
        self.me = psutil.Process()
        self.base = self.me.memory_info().rss
        self.peak = self.base
        self.stall = 0.0
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self.me.memory_info().rss)

    async def watch(self, work):
        self._sampler.start()
        done = asyncio.Event()

        async def tick() -> None:
            last = time.perf_counter()
            while not done.is_set():
                await asyncio.sleep(0.01)
                now = time.perf_counter()
                self.stall = max(self.stall, now - last)
                last = now

        ticker = asyncio.ensure_future(tick())
        try:
            return await work
        finally:
            done.set()
            await ticker
            self._stop.set()
            self._sampler.join()

    @property
    def grown_mb(self) -> float:
        return (self.peak - self.base) / 2**20


@pytest.mark.parametrize("name", CASES)
async def test_hostile_program_gets_a_verdict_and_the_grader_stays_healthy(grader, leased, name):
    case = CASES[name]
    func_name = "twoSum" if case.test.testtype == "functional" else None
    program = case.program if func_name is None or "class Solution" in case.program else \
        case.program + "\nclass Solution:\n    def twoSum(self, nums, target):\n        return [0, 1]\n"
    dirs, fds = code_dirs(), len(os.listdir("/proc/self/fd"))
    health = Health()
    started = time.perf_counter()
    ok, verdict = await health.watch(grader.run_test(program, case.test, func_name))
    elapsed = time.perf_counter() - started
    assert verdict == case.verdict and ok is (case.verdict == "ok")
    assert elapsed < grader.sandbox.limits.wall_seconds + 5, "the run ends in bounded time"
    assert health.grown_mb < 120, f"the grader grew by {health.grown_mb:.0f} MB"
    assert health.stall < 0.5, f"the event loop stalled for {health.stall:.2f} s"
    assert leased and live_processes(leased) == [], "nothing the program started outlives its test"
    assert code_dirs() == dirs and len(os.listdir("/proc/self/fd")) == fds, "no directory or descriptor is left"


async def test_the_grader_still_grades_after_the_hostile_suite(grader):
    assert await grader.run_test("a, b = map(int, input().split())\nprint(a + b)", SUM, None) == (True, "ok")
    assert await grader.run_test(solution("pass"), TWO_SUM, "twoSum") == (True, "ok")
    # A common way to recurse deeply: a thread with a big stack (threads are allowed; processes are not).
    deep = ("import sys, threading\nsys.setrecursionlimit(10**6)\nthreading.stack_size(2**26)\n"
            "def depth(n):\n    return 0 if n == 0 else 1 + depth(n - 1)\n"
            "def main():\n    a, b = map(int, input().split())\n    print(a + b + depth(100_000) - 100_000)\n"
            "t = threading.Thread(target=main)\nt.start()\nt.join()\n")
    assert await grader.run_test(deep, SUM, None) == (True, "ok")


def test_comparisons_are_total():
    """Whatever text either side holds, a comparison returns a bool."""
    nasty = ["sNaN", "NaN", "-sNaN123", "Infinity", "1e999999999999999999", "1e-999999999", "1" * 5000, "٣",
             "[" * 100_000, "]", "{\"a\": " * 50_000, "\x00", "0x10", "1_000", "  ", ""]
    for a in nasty:
        for b in ["3", "sNaN", "1" * 5000, "[0, 1]", "NaN"]:
            assert isinstance(stdin_matches(a, b), bool) and isinstance(functional_matches(a, b), bool)
    assert stdin_matches("3.0\n", "3") and stdin_matches("1e3", "1000") and not stdin_matches("٣", "3")
    assert stdin_matches("1" * 5000, "1" * 5000) and not stdin_matches("sNaN", "sNaN 1")
    assert functional_matches("[1.0, 2]", "[1, 2.0]") and not functional_matches("[" * 200_000, "[0, 1]")


# -- the seccomp filter ---------------------------------------------------------------------------------
def test_every_denied_call_is_in_the_filter():
    text = describe()
    for name in [*DENIED, "clone3", "clone", "socket", "ioctl"]:
        block = re.search(rf'# filter for syscall "{name}" \(\d+\).*?\n(.*?)(?=\n  # |\Z)', text, re.S)
        assert block, f"{name} is not in the filter"
        action = "ERRNO(38)" if name == "clone3" else "ERRNO(1)"
        assert action in block.group(1), f"{name}: {block.group(1)}"
    clone = re.search(r'# filter for syscall "clone".*?(?=\n  # )', text, re.S).group(0)
    for flag in CLONE_NAMESPACES.values():
        assert f"== {flag}" in clone, "every namespace flag is refused to clone"
    assert "& 0x00010000 == 0" in clone, "clone without CLONE_THREAD (a new process) is refused"
    ioctl = re.search(r'# filter for syscall "ioctl".*?(?=\n  # )', text, re.S).group(0)
    assert all(f"== {request}" in ioctl for request in DENIED_IOCTLS.values())
    assert text.rstrip().splitlines()[-4] == "action KILL;", "another architecture's calls kill the program"


PROBE = CTYPES + """import errno, json, threading
calls = {
    "fork": (57,), "vfork": (58,), "unshare": (272, 0x10000000), "setns": (308, 0, 0), "ptrace": (101, 16, 1, 0, 0),
    "process_vm_readv": (310, 1, 0, 0, 0, 0, 0), "kcmp": (312, 1, 1, 0, 0, 0), "io_uring_setup": (425, 8, 0),
    "keyctl": (250, 0, -3, 1), "add_key": (248, 0, 0, 0, 0, 0), "mount": (165, 0, 0, 0, 0, 0), "bpf": (321, 0, 0, 0),
    "perf_event_open": (298, 0, 0, -1, -1, 0), "userfaultfd": (323, 0), "memfd_create": (319, 1, 0),
    "personality": (135, 0xFFFFFFFF), "pidfd_getfd": (438, 0, 0, 0), "open_tree": (428, -100, 0, 0),
    "clone3": (435, 0, 0), "clone as fork": (56, 17, 0, 0, 0, 0),
    "clone with CLONE_NEWUSER": (56, 0x10000000 | 17, 0, 0, 0, 0),
    "socket AF_INET": (41, 2, 1, 0), "socket AF_NETLINK": (41, 16, 3, 0), "ioctl TIOCSTI": (16, 0, 0x5412, 0),
}
out = {}
for name, (nr, *args) in calls.items():
    ctypes.set_errno(0)
    r = libc.syscall(nr, *[ctypes.c_long(a) for a in args])
    if r == 0 and name in ("fork", "vfork", "clone as fork"):
        os._exit(0)
    out[name] = errno.errorcode.get(ctypes.get_errno(), str(ctypes.get_errno())) if r < 0 else "allowed"
t = threading.Thread(target=lambda: out.__setitem__("thread", "started"))
t.start()
t.join()
import _socket
a, b = _socket.socketpair()
out["socketpair AF_UNIX"] = "allowed"
print(json.dumps(out))
"""


def test_each_denied_call_fails_inside_the_sandbox(grader):
    outcome = grader.sandbox.run(PROBE, "")
    assert outcome.status == "ok", outcome.stderr
    seen = json.loads(outcome.stdout)
    expected = {name: "EPERM" for name in seen}
    expected.update({"clone3": "ENOSYS", "thread": "started", "socketpair AF_UNIX": "allowed"})
    assert seen == expected


def test_the_sandbox_refuses_to_run_without_a_seccomp_filter(monkeypatch):
    from markov_rsa.evals.grading.seccomp import SeccompUnavailableError

    def unavailable() -> bytes:
        raise SeccompUnavailableError("no seccomp filter: Unable to find libseccomp")

    monkeypatch.setattr(sandbox_module, "program_filter", unavailable)
    with pytest.raises(sandbox_module.SandboxUnavailableError, match="seccomp") as raised:
        Sandbox()
    assert "\n" not in str(raised.value) and "--unsafe-no-sandbox" in str(raised.value)


# -- identities -----------------------------------------------------------------------------------------
LEASE_SCRIPT = """
import sys, time
from pathlib import Path
from markov_rsa.evals.grading.uids import lease_uid
leases = [lease_uid(Path(sys.argv[1]), count=int(sys.argv[2])) for _ in range(int(sys.argv[3]))]
print(" ".join(str(lease.uid) for lease in leases), flush=True)
sys.stdin.read()  # hold them until told to stop
"""


def test_uids_are_never_shared_across_processes(tmp_path):
    locks = tmp_path / "locks"
    holders = [subprocess.Popen([sys.executable, "-c", LEASE_SCRIPT, str(locks), "64", "20"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
               for _ in range(3)]
    try:
        held = [set(map(int, h.stdout.readline().split())) for h in holders]
        mine = [lease_uid(locks, count=64) for _ in range(4)]
        everyone = [*held, {lease.uid for lease in mine}]
        assert [len(s) for s in everyone] == [20, 20, 20, 4]
        assert len(set().union(*everyone)) == 64, "no uid is held twice"
        with pytest.raises(Exception, match="all 64 sandbox uids are in use"):
            lease_uid(locks, count=64)
        holders[0].kill()
        holders[0].wait()
        freed = {lease_uid(locks, count=64).uid for _ in range(20)}
        assert freed == held[0], "a killed holder's uids are free again"
    finally:
        for h in holders:
            h.kill()
            h.wait()


def test_the_uid_lock_directory_must_be_private(tmp_path):
    exposed = tmp_path / "exposed"
    exposed.mkdir(mode=0o777)
    exposed.chmod(0o777)
    with pytest.raises(Exception, match="nobody else"):
        lease_uid(exposed)
    link = tmp_path / "link"
    link.symlink_to(tmp_path)
    with pytest.raises(Exception, match="nobody else"):
        lease_uid(link)


def test_two_sandboxes_in_one_process_never_kill_each_others_programs():
    """Each run's clean-up kills its uid's processes: a shared uid would kill the other's program."""
    first, second = (Sandbox(SandboxLimits(wall_seconds=8)) for _ in range(2))
    program = "import time\ntime.sleep(1.5)\nprint('done')\n"
    results: list[str] = []

    def run(sandbox: Sandbox, delay: float) -> None:
        time.sleep(delay)
        outcome = sandbox.run(program if delay else "print('quick')\n", "")
        results.append(f"{outcome.status} {outcome.stdout.strip()}")

    workers = [threading.Thread(target=run, args=(s, d)) for s, d in [(first, 0.0), (second, 0.3), (first, 0.3)]]
    [w.start() for w in workers]
    [w.join() for w in workers]
    assert sorted(results) == ["ok done", "ok done", "ok quick"]


# -- nothing left behind by a killed grader -------------------------------------------------------------
def test_a_killed_graders_code_directories_are_removed_at_the_next_start(tmp_path):
    stale = tmp_path / f"{CODE_DIR_PREFIX}stale"
    stale.mkdir()
    (stale / "solution.py").write_text("print(1)")
    held = tmp_path / f"{CODE_DIR_PREFIX}held"
    held.mkdir()
    young = tmp_path / f"{CODE_DIR_PREFIX}young"
    young.mkdir()
    old = time.time() - 3600
    os.utime(stale, (old, old))
    os.utime(held, (old, old))
    import fcntl

    fd = os.open(held, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        assert remove_stale_code_dirs(tmp_path) == [stale]
    finally:
        os.close(fd)
    assert not stale.exists() and held.exists() and young.exists(), "live and just-made directories stay"


def test_rlimits_runs_leave_no_code_directory():
    before = code_dirs()
    assert Sandbox(isolation="rlimits").run("print(1)", "").stdout == "1\n"
    assert code_dirs() == before


# -- the whole path: rsa eval lcb -----------------------------------------------------------------------
def test_rsa_eval_lcb_scores_a_hostile_program_as_wrong_not_missing(tmp_path):
    """One problem answered right, one answered by a program printing sNaN: 50%, both counted."""
    data = tmp_path / "data" / "livecodebench"
    data.mkdir(parents=True)
    row = json.loads((DATASETS / "livecodebench" / "code_generation_lite_1873_A.jsonl").read_text().splitlines()[0])
    tests = json.dumps([{"input": "1 2\n", "output": "3\n", "testtype": "stdin"}])
    hostile = {**row, "question_title": "A plus B", "question_id": "ab_1", "question_content": "Print a + b.",
               "public_test_cases": tests, "private_test_cases": tests}
    lcb_problem(hostile)  # a valid row
    (data / "two.jsonl").write_text(json.dumps(row) + "\n" + json.dumps(hostile) + "\n")
    right = ("t = int(input())\nfor _ in range(t):\n    s = input().strip()\n"
             "    print('YES' if sum(a != b for a, b in zip(s, 'abc')) in (0, 2) else 'NO')\n")

    def reply(body: dict) -> str:
        prompt = json.dumps(body)
        return f"```python\n{'print(chr(115) + chr(78) + chr(97) + chr(78))' if 'a + b' in prompt else right}\n```"

    server = FaultServer(reply=reply)
    with serve_app(server.app()) as url:
        command = [sys.executable, "-c", "from markov_rsa.cli.app import main; main()", "eval", "lcb",
                   "--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "run"), "--base-url", f"{url}/v1",
                   "--model", "fault-model", "--preset", "parallel", "--population", "1"]
        out = subprocess.run(command, capture_output=True, text=True, timeout=300,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "run" / "problems.jsonl").read_text().splitlines()]
    assert sorted((r["problem_id"], r["correct"]) for r in records) == [("1873_A", True), ("ab_1", False)]
    assert re.search(r"problems: 2\n", out.stderr) and re.search(r"final: 50\.0 ", out.stderr), out.stderr[-2000:]
