"""Running untrusted programs: one process per test, limited, isolated, and disposable.

Layers, each covering what the previous may miss:
1. bubblewrap, where installed and working: new user, PID, network, IPC and UTS namespaces and a
   read-only root in which only the throw-away working directory is writable. The program cannot
   reach the network, see or signal the harness, or write anywhere else.
2. rlimits on CPU time, address space, file size (stdout goes to a file, so this caps output),
   open files and processes, plus a wall-clock deadline that kills the whole process group.
3. In the interpreter, before the program runs: process creation, signals and sockets are
   disabled, as LiveCodeBench's own harness does. This also stops fork bombs where rlimits cannot
   (the process limit does not bind root).
The environment is replaced, so no secret of the harness (an API key) reaches the program.
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Status = Literal["ok", "error", "timeout", "memory", "output_limit"]

_GUARD = r'''
import builtins, faulthandler, json, os, sys

def _blocked(*args, **kwargs):
    raise PermissionError("not allowed in the sandbox")

def _guard():
    import shutil, socket, subprocess
    for name in ("fork", "forkpty", "kill", "killpg", "system", "popen", "execv", "execve", "execvp", "execvpe",
                 "execl", "execle", "execlp", "execlpe", "spawnv", "spawnve", "spawnl", "spawnle", "posix_spawn",
                 "posix_spawnp", "setuid", "setgid", "chroot", "putenv", "unsetenv", "register_at_fork"):
        if hasattr(os, name):
            setattr(os, name, _blocked)
    subprocess.Popen = _blocked
    shutil.rmtree = _blocked
    socket.socket = _blocked
    socket.create_connection = _blocked
    for name in ("_posixsubprocess", "resource", "multiprocessing", "ctypes", "_ctypes"):
        sys.modules[name] = None

def _to_plain(value):
    if isinstance(value, tuple):
        return [_to_plain(v) for v in value]
    if isinstance(value, list):
        return [_to_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    return value

mode, func_name = sys.argv[1], sys.argv[2]
source = open("solution.py", encoding="utf-8").read()
_guard()
if mode == "stdin":
    exec(compile(source, "solution.py", "exec"), {"__name__": "__main__"})
else:
    args = [json.loads(line) for line in sys.stdin.read().split("\n") if line.strip()]
    namespace = {"__name__": "solution"}
    exec(compile("from typing import *\nfrom collections import *\nimport math, heapq, bisect, itertools\n" + source,
                 "solution.py", "exec"), namespace)
    if "Solution" in namespace:
        target = getattr(namespace["Solution"](), func_name)
    else:
        target = namespace[func_name]
    result = target(*args)
    sys.stdout.write(json.dumps(_to_plain(result)))
'''


@dataclass(frozen=True)
class SandboxLimits:
    cpu_seconds: int = 6
    wall_seconds: float = 10.0
    memory_mb: int = 1024
    output_bytes: int = 8 * 1024 * 1024
    max_processes: int = 16
    max_open_files: int = 64


@dataclass(frozen=True)
class RunOutcome:
    status: Status
    stdout: str
    stderr: str
    returncode: int
    seconds: float


def bwrap_works() -> bool:
    """Whether bubblewrap is installed and can create its namespaces here."""
    exe = shutil.which("bwrap")
    if exe is None:
        return False
    try:
        probe = subprocess.run([exe, "--ro-bind", "/", "/", "--unshare-all", "--die-with-parent", "true"],
                               capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0


class Sandbox:
    """Runs one program on one input. Thread-safe: every run gets its own directory and process."""

    def __init__(self, limits: SandboxLimits | None = None, *, python: str | None = None,
                 isolation: Literal["auto", "bwrap", "rlimits"] = "auto") -> None:
        self.limits = limits or SandboxLimits()
        self.python = python or sys.executable
        if isolation == "auto":
            isolation = "bwrap" if bwrap_works() else "rlimits"
        self.isolation = isolation

    def _limit(self) -> None:  # runs in the child between fork and exec
        lim = self.limits
        os.setsid()
        resource.setrlimit(resource.RLIMIT_CPU, (lim.cpu_seconds, lim.cpu_seconds + 1))
        resource.setrlimit(resource.RLIMIT_AS, (lim.memory_mb * 2**20,) * 2)
        resource.setrlimit(resource.RLIMIT_FSIZE, (lim.output_bytes,) * 2)
        resource.setrlimit(resource.RLIMIT_NOFILE, (lim.max_open_files,) * 2)
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if os.geteuid() != 0:  # for root the kernel ignores it; the interpreter guard covers that case
            used = sum(1 for p in Path("/proc").iterdir() if p.name.isdigit() and _owned(p))
            resource.setrlimit(resource.RLIMIT_NPROC, (used + lim.max_processes,) * 2)

    def run(self, source: str, stdin: str, *, func_name: str | None = None) -> RunOutcome:
        workdir = Path(tempfile.mkdtemp(prefix="markov-rsa-sandbox-"))
        try:
            return self._run_in(workdir, source, stdin, func_name)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)

    def _run_in(self, workdir: Path, source: str, stdin: str, func_name: str | None) -> RunOutcome:
        (workdir / "solution.py").write_text(source, encoding="utf-8")
        (workdir / "guard.py").write_text(_GUARD, encoding="utf-8")
        (workdir / "stdin.txt").write_text(stdin, encoding="utf-8")
        mode = "functional" if func_name else "stdin"
        command = [self.python, "-I", "-B", "guard.py", mode, func_name or "-"]
        if self.isolation == "bwrap":
            workdir.chmod(0o777)
            command = [
                "bwrap", "--ro-bind", "/", "/", "--bind", str(workdir), str(workdir),
                "--dev", "/dev", "--proc", "/proc", "--unshare-all", "--die-with-parent", "--new-session",
                "--uid", "65534", "--gid", "65534", "--chdir", str(workdir), *command,
            ]
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": str(workdir),
               "PYTHONHASHSEED": "0", "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
        start = time.perf_counter()
        with open(workdir / "stdin.txt", "rb") as fin, open(workdir / "stdout.txt", "wb") as fout, \
                open(workdir / "stderr.txt", "wb") as ferr:
            process = subprocess.Popen(command, stdin=fin, stdout=fout, stderr=ferr, cwd=workdir, env=env,
                                       preexec_fn=self._limit)
            timed_out = False
            try:
                process.wait(timeout=self.limits.wall_seconds)
            except subprocess.TimeoutExpired:
                timed_out = True
                _kill_group(process)
                process.wait()
        seconds = time.perf_counter() - start
        stdout = (workdir / "stdout.txt").read_bytes()[: self.limits.output_bytes].decode("utf-8", "replace")
        stderr = (workdir / "stderr.txt").read_bytes()[-4000:].decode("utf-8", "replace")
        code = process.returncode
        # A signal shows as -N directly, or as 128+N when bubblewrap reports its child's death.
        died_of = -code if code < 0 else code - 128 if code > 128 else 0
        if timed_out or (died_of in (signal.SIGXCPU, signal.SIGKILL) and seconds >= self.limits.cpu_seconds * 0.9):
            status: Status = "timeout"
        elif died_of == signal.SIGXFSZ or "File too large" in stderr:
            status = "output_limit"
        elif "MemoryError" in stderr:
            status = "memory"
        elif code != 0:
            status = "error"
        else:
            status = "ok"
        return RunOutcome(status, stdout, stderr, code, seconds)


def _owned(proc: Path) -> bool:
    try:
        return proc.stat().st_uid == os.geteuid()
    except OSError:
        return False


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        process.kill()
