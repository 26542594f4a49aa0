"""Running untrusted programs: one process per test, isolated, bounded and disposable.

What is isolated (``isolation="bwrap"``, the default; it refuses to run where bubblewrap cannot work):
- Filesystem: the program sees only ``/usr`` (read-only; ``/bin``, ``/lib`` are its links), a private
  ``/proc`` and ``/dev``, its read-only code at ``/sandbox`` and a size-capped writable ``/scratch``,
  ``/tmp`` and ``/dev/shm``. No ``/root``, ``/home``, ``/etc``, work tree, caches, datasets or host
  ``/tmp``: private tests stay with the harness, which passes one test's input on stdin.
- Identity: when the harness runs as root, each program runs as its own unprivileged uid (from a
  range no account uses), so the process limit binds and nothing it could reach is writable.
- Namespaces: new user, PID, network, IPC, UTS and cgroup namespaces. No network at all; the host's
  processes are invisible, so it cannot signal the harness or read another process's environment;
  when the test ends the namespace's init dies and the kernel kills everything the program started,
  ``setsid`` daemons included.
- Limits: CPU seconds, address space, file size (so stdout is capped), open files, processes, and a
  wall-clock deadline; disk is capped by the tmpfs sizes.
- Output: stdout, stderr and the call-based result go to unlinked files the harness opened before
  launch, outside anything the program can see, and are read with a size cap; nothing is reopened by
  path, so FIFOs and symlinks in its directory cannot hang or mislead the grader.
- Environment: replaced; no secret of the harness (an API key) reaches the program.
In the interpreter, process creation, signals and sockets are also disabled before the program runs
(as LiveCodeBench's harness does); that guard is defence in depth, not the boundary.

``isolation="rlimits"`` (``rsa eval --unsafe-no-sandbox``) runs with the limits and the interpreter
guard only: a hostile program can then escape. It is for people who accept that risk.
"""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal

from markov_rsa.errors import MarkovRSAError

Status = Literal["ok", "error", "timeout", "memory", "output_limit"]
Isolation = Literal["bwrap", "rlimits"]

_GUARD = r'''
import builtins, faulthandler, io, json, os, sys

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

mode, func_name, code, result_fd = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
result = os.fdopen(result_fd, "w") if mode == "functional" else None
if result is None:
    os.close(result_fd)
source = open(code, encoding="utf-8").read()
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
    value = target(*args)
    result.write(json.dumps(_to_plain(value)))
    result.flush()
'''


class SandboxUnavailableError(MarkovRSAError):
    """Real isolation is required and cannot work here; the message says how to get it."""

    exit_code = 2


@dataclass(frozen=True)
class SandboxLimits:
    cpu_seconds: int = 6
    wall_seconds: float = 10.0
    memory_mb: int = 1024
    output_bytes: int = 8 * 1024 * 1024
    max_processes: int = 16
    max_open_files: int = 64
    #: Size of each writable tmpfs (/scratch, /tmp, /dev/shm).
    disk_mb: int = 64


@dataclass(frozen=True)
class RunOutcome:
    status: Status
    stdout: str
    stderr: str
    returncode: int
    seconds: float
    #: A call-based program's return value as JSON (None for stdin programs or when it crashed).
    result: str | None = None


#: Sandboxed programs run as uids from here on (when the harness is root); no account uses them.
UID_BASE = 0x5A000000


def _system_python() -> str:
    for candidate in ("/usr/bin/python3", "/usr/local/bin/python3"):
        if os.access(candidate, os.X_OK):
            return candidate
    return sys.executable


class Sandbox:
    """Runs one program on one input. Thread-safe: every run gets its own uid, files and namespaces."""

    def __init__(self, limits: SandboxLimits | None = None, *, python: str | None = None,
                 isolation: Isolation = "bwrap") -> None:
        self.limits = limits or SandboxLimits()
        self.python = python or (_system_python() if isolation == "bwrap" else sys.executable)
        if isolation not in ("bwrap", "rlimits"):
            raise ValueError(f"isolation must be bwrap or rlimits, got {isolation!r}")
        self.isolation: Isolation = isolation
        self._lock = threading.Lock()
        self._free_uids = list(range(64))
        self._bwrap = shutil.which("bwrap")
        if isolation == "bwrap":
            self._check_bwrap()

    # -- isolation ------------------------------------------------------------------------------
    def _check_bwrap(self) -> None:
        """Refuse to construct a bubblewrap sandbox that cannot work: fail closed, with what to do."""
        how = ("install bubblewrap (apt-get install bubblewrap) on a kernel that allows unprivileged user "
               "namespaces, or pass --unsafe-no-sandbox to run untrusted programs with rlimits only")
        if self._bwrap is None:
            raise SandboxUnavailableError(f"code grading runs untrusted programs and needs bubblewrap: {how}")
        probe = self.run("print(6 * 7)\n", "")
        if probe.status != "ok" or probe.stdout.strip() != "42":
            detail = (probe.stderr.strip().splitlines() or [probe.status])[-1][:200]
            raise SandboxUnavailableError(f"bubblewrap does not work here ({detail}): {how}")

    def _bwrap_command(self, code_dir: Path, inner: list[str]) -> list[str]:
        assert self._bwrap is not None
        mb = self.limits.disk_mb * 2**20
        command = [self._bwrap, "--unshare-all", "--die-with-parent", "--new-session", "--hostname", "sandbox",
                   "--ro-bind", "/usr", "/usr"]
        for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
            path = Path("/") / name
            if path.is_symlink():
                command += ["--symlink", os.readlink(path), str(path)]
            elif path.is_dir():
                command += ["--ro-bind", str(path), str(path)]
        python_home = Path(os.path.realpath(self.python)).parent.parent
        if not str(python_home).startswith("/usr"):
            command += ["--ro-bind", str(python_home), str(python_home)]
        command += ["--proc", "/proc", "--dev", "/dev", "--size", str(mb), "--tmpfs", "/dev/shm",
                    "--size", str(mb), "--tmpfs", "/tmp", "--size", str(mb), "--tmpfs", "/scratch",
                    "--ro-bind", str(code_dir), "/sandbox", "--chdir", "/scratch", "--uid", "65534", "--gid", "65534",
                    "--clearenv"]
        for key, value in self._env("/scratch").items():
            command += ["--setenv", key, value]
        return [*command, *inner]

    def _env(self, home: str) -> dict[str, str]:
        return {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": home, "PYTHONHASHSEED": "0",
                "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}

    def _acquire_uid(self) -> int | None:
        if os.geteuid() != 0 or self.isolation != "bwrap":
            return None
        while True:
            with self._lock:
                if self._free_uids:
                    # Oldest first: a uid is reused only after the others, by when its zombies (which still
                    # count against its process limit) are long reaped.
                    slot = self._free_uids.pop(0)
                    return UID_BASE + (os.getpid() % 4096) * 64 + slot
            time.sleep(0.01)

    def _release_uid(self, uid: int | None) -> None:
        if uid is not None:
            with self._lock:
                self._free_uids.append((uid - UID_BASE) % 64)

    def _preexec(self, uid: int | None) -> None:  # runs in the child between fork and exec (after setuid)
        lim = self.limits
        resource.setrlimit(resource.RLIMIT_CPU, (lim.cpu_seconds, lim.cpu_seconds + 1))
        resource.setrlimit(resource.RLIMIT_AS, (lim.memory_mb * 2**20,) * 2)
        resource.setrlimit(resource.RLIMIT_FSIZE, (lim.output_bytes,) * 2)
        resource.setrlimit(resource.RLIMIT_NOFILE, (lim.max_open_files,) * 2)
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if uid is not None:  # a uid of its own: the process limit counts this program alone
            resource.setrlimit(resource.RLIMIT_NPROC, (lim.max_processes,) * 2)
        elif os.geteuid() != 0:
            used = sum(1 for p in Path("/proc").iterdir() if p.name.isdigit() and _owned(p))
            resource.setrlimit(resource.RLIMIT_NPROC, (used + lim.max_processes,) * 2)

    # -- running ----------------------------------------------------------------------------------
    def run(self, source: str, stdin: str, *, func_name: str | None = None) -> RunOutcome:
        code_dir = Path(tempfile.mkdtemp(prefix="markov-rsa-code-"))
        uid = self._acquire_uid()
        try:
            return self._run_in(code_dir, source, stdin, func_name, uid)
        finally:
            self._release_uid(uid)
            shutil.rmtree(code_dir, ignore_errors=True)

    def _run_in(self, code_dir: Path, source: str, stdin: str, func_name: str | None, uid: int | None) -> RunOutcome:
        (code_dir / "solution.py").write_text(source, encoding="utf-8")
        (code_dir / "guard.py").write_text(_GUARD, encoding="utf-8")
        code_dir.chmod(0o755)
        for path in code_dir.iterdir():
            path.chmod(0o644)
        mode = "functional" if func_name else "stdin"
        with tempfile.TemporaryFile() as fin, tempfile.TemporaryFile() as fout, tempfile.TemporaryFile() as ferr, \
                tempfile.TemporaryFile() as fres:
            result_fd = str(fres.fileno())
            if self.isolation == "bwrap":
                inner = [self.python, "-I", "-S", "-B", "/sandbox/guard.py", mode, func_name or "-",
                         "/sandbox/solution.py", result_fd]
                command, cwd, env = self._bwrap_command(code_dir, inner), "/", {}
            else:
                work = Path(tempfile.mkdtemp(prefix="markov-rsa-work-", dir=code_dir))
                inner = [self.python, "-I", "-B", str(code_dir / "guard.py"), mode, func_name or "-",
                         str(code_dir / "solution.py"), result_fd]
                command, cwd, env = inner, str(work), self._env(str(work))
            fin.write(stdin.encode("utf-8"))
            fin.seek(0)
            start = time.perf_counter()
            process, timed_out = self._launch(command, cwd, env, fin, fout, ferr, fres, uid)
            seconds = time.perf_counter() - start
            stdout = _read_capped(fout, self.limits.output_bytes)
            stderr = _read_capped(ferr, self.limits.output_bytes)[-4000:]
            result = _read_capped(fres, self.limits.output_bytes) if func_name else None
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
        return RunOutcome(status, stdout, stderr, code, seconds, result or None)

    def _launch(self, command: list[str], cwd: str, env: dict[str, str], fin: IO[bytes], fout: IO[bytes],
                ferr: IO[bytes], fres: IO[bytes], uid: int | None) -> tuple[subprocess.Popen[bytes], bool]:
        # The result file is handed over as an extra descriptor: stdout may hold the program's prints.
        process = subprocess.Popen(
            command, stdin=fin, stdout=fout, stderr=ferr, cwd=cwd, env=env, close_fds=True,
            pass_fds=(fres.fileno(),), start_new_session=True, preexec_fn=lambda: self._preexec(uid),
            user=uid, group=uid, extra_groups=None if uid is None else [],
        )
        timed_out = False
        try:
            process.wait(timeout=self.limits.wall_seconds)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(process)
            process.wait()
        _kill_group(process)  # anything the program left behind in its session goes too
        if uid is not None:
            _reap_uid(uid)
        return process, timed_out



def _read_capped(handle: IO[bytes], limit: int) -> str:
    handle.seek(0)
    return handle.read(limit).decode("utf-8", "replace")


def bwrap_works() -> bool:
    """Whether a bubblewrap sandbox can run programs here."""
    try:
        Sandbox(isolation="bwrap")
    except SandboxUnavailableError:
        return False
    return True


def _owned(proc: Path) -> bool:
    try:
        return proc.stat().st_uid == os.geteuid()
    except OSError:
        return False


def _reap_uid(uid: int, timeout: float = 5.0) -> None:
    """Kill whatever still runs as ``uid`` and wait until it is gone: the run is over only then."""
    deadline = time.monotonic() + timeout
    while True:
        left = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if entry.stat().st_uid == uid and not _zombie(entry):
                    left.append(int(entry.name))
            except OSError:
                continue
        if not left or time.monotonic() > deadline:
            return
        for pid in left:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.01)


def _zombie(proc: Path) -> bool:
    """Already dead, only waiting to be reaped by the host's init (it runs nothing)."""
    stat = (proc / "stat").read_text()
    return stat[stat.rindex(")") + 2:].startswith("Z")


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        process.kill()
