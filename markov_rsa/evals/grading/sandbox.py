"""Running untrusted programs: one process per test, isolated, bounded and disposable.

What is isolated (``isolation="bwrap"``, the default; it refuses to run where bubblewrap cannot work):
- Filesystem: the program sees only ``/usr`` (read-only; ``/bin``, ``/lib`` are its links), a private
  ``/proc`` and ``/dev``, its read-only code at ``/sandbox`` and a size-capped writable ``/scratch``,
  ``/tmp`` and ``/dev/shm``. No ``/root``, ``/home``, ``/etc``, work tree, caches, datasets or host
  ``/tmp``: private tests stay with the harness, which passes one test's input on stdin.
- Identity: when the harness runs as root, each program runs as its own unprivileged uid, leased
  machine-wide (:mod:`.uids`), so the process limit binds, no two programs' clean-ups touch each
  other, and nothing it could reach is writable.
- Namespaces: new user, PID, network, IPC, UTS and cgroup namespaces. No network at all; the host's
  processes are invisible, so it cannot signal the harness or read another process's environment;
  when the test ends the namespace's init dies and the kernel kills everything the program started.
  It cannot make namespaces of its own (``--disable-userns`` and the seccomp filter).
- System calls: a seccomp filter (:mod:`.seccomp`) denies what a contest program never needs: new
  processes (threads are allowed), namespaces, ptrace, io_uring, keyrings, mounts, BPF, sockets
  other than AF_UNIX. One process means the address-space limit bounds the program's total memory.
- Limits: CPU seconds, address space, file size (so stdout is capped), open files, threads, and a
  wall-clock deadline; disk is capped by the tmpfs sizes.
- Code and output: the program and the harness's guard arrive as bubblewrap data files (no host
  directory is mounted, so ``/proc/self/mountinfo`` names none); stdout, stderr and the call-based
  result go to unlinked files the harness opened before launch, outside anything the program can
  see, and are read with a size cap; nothing is reopened by path.
- Verdicts come from what the harness observes (its deadline, the exit status and signal, the size
  its output files reached, the guard's exit code for MemoryError), never from stderr text.
- Environment: replaced; no secret of the harness (an API key) reaches the program, and
  ``/usr/local/etc`` (where tools keep their configuration) is hidden.
In the interpreter, process creation, signals and sockets are also disabled before the program runs
(as LiveCodeBench's harness does); that guard is defence in depth, not the boundary.

``isolation="rlimits"`` (``rsa eval --unsafe-no-sandbox``) runs with the limits and the interpreter
guard only: a hostile program can then escape, and its memory is bounded per process, not in total.
It is for people who accept that risk. Its code directories are locked while in use; a killed
grader's are removed when the next ``Sandbox`` starts.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal

from markov_rsa.errors import MarkovRSAError
from markov_rsa.evals.grading.seccomp import SeccompUnavailableError, program_filter
from markov_rsa.evals.grading.uids import UID_BASE, UidLease, UidUnavailableError, lease_uid

__all__ = ["MEMORY_EXIT", "UID_BASE", "RunOutcome", "Sandbox", "SandboxLimits", "SandboxUnavailableError",
           "bwrap_works"]

Status = Literal["ok", "error", "timeout", "memory", "output_limit"]
Isolation = Literal["bwrap", "rlimits"]

#: The guard's exit status when the program ran out of memory (in any thread).
MEMORY_EXIT = 86
#: rlimits mode's per-run directories; one nobody holds (its grader was killed) is removed later.
CODE_DIR_PREFIX = "markov-rsa-code-"

_GUARD = r'''
import builtins, faulthandler, io, json, os, sys, threading

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

def _main():
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
        exec(compile("from typing import *\nfrom collections import *\nimport math, heapq, bisect, itertools\n"
                     + source, "solution.py", "exec"), namespace)
        if "Solution" in namespace:
            target = getattr(namespace["Solution"](), func_name)
        else:
            target = namespace[func_name]
        value = target(*args)
        result.write(json.dumps(_to_plain(value)))
        result.flush()

def _thread_died(args, _default=threading.excepthook):
    if issubclass(args.exc_type, MemoryError):
        os._exit(MEMORY_EXIT)
    _default(args)

# Running out of memory is reported by exit status (the harness never reads stderr for a verdict).
threading.excepthook = _thread_died
try:
    _main()
except MemoryError:
    os._exit(MEMORY_EXIT)
'''.replace("MEMORY_EXIT", str(MEMORY_EXIT))


class SandboxUnavailableError(MarkovRSAError):
    """Real isolation is required and cannot work here; the message says how to get it."""

    exit_code = 2


@dataclass(frozen=True)
class SandboxLimits:
    cpu_seconds: int = 6
    wall_seconds: float = 10.0
    #: The program's whole address space (it is one process: the seccomp filter denies new ones).
    memory_mb: int = 1024
    output_bytes: int = 8 * 1024 * 1024
    #: Threads (with bubblewrap) or processes (rlimits only) at once.
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


#: Of stderr only the end is kept: it explains a crash to a person and decides nothing.
STDERR_TAIL = 4000


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
        self._bwrap = shutil.which("bwrap")
        self._seccomp = b""
        self._disable_userns = False
        remove_stale_code_dirs()
        if isolation == "bwrap":
            self._check_bwrap()

    # -- isolation ------------------------------------------------------------------------------
    def _check_bwrap(self) -> None:
        """Refuse to construct a bubblewrap sandbox that cannot work: fail closed, with what to do."""
        how = ("install bubblewrap (apt-get install bubblewrap) on a kernel that allows unprivileged user "
               "namespaces, or pass --unsafe-no-sandbox to run untrusted programs with rlimits only")
        if self._bwrap is None:
            raise SandboxUnavailableError(f"code grading runs untrusted programs and needs bubblewrap: {how}")
        try:
            self._seccomp = program_filter()
        except SeccompUnavailableError as exc:
            raise SandboxUnavailableError(f"code grading needs a seccomp filter: {exc}; or pass "
                                          "--unsafe-no-sandbox to run untrusted programs with rlimits only") from None
        self._disable_userns = _bwrap_version(self._bwrap) >= (0, 8, 0)
        probe = self.run("print(6 * 7)\nprint(open('/proc/self/status').read())\n", "")
        if probe.status != "ok" or probe.stdout.split("\n", 1)[0] != "42":
            detail = (probe.stderr.strip().splitlines() or [probe.status])[-1][:200]
            raise SandboxUnavailableError(f"bubblewrap does not work here ({detail}): {how}")
        status = dict(re.findall(r"^(\w+):\s*(\S+)", probe.stdout, re.MULTILINE))
        if status.get("Seccomp") != "2" or status.get("NoNewPrivs") != "1":
            raise SandboxUnavailableError("the seccomp filter is not in force inside the sandbox (Seccomp: "
                                          f"{status.get('Seccomp')}): use a kernel with seccomp filtering, or "
                                          "pass --unsafe-no-sandbox to run untrusted programs with rlimits only")

    def _bwrap_command(self, files: dict[str, IO[bytes]], inner: list[str]) -> list[str]:
        assert self._bwrap is not None
        mb = self.limits.disk_mb * 2**20
        command = [self._bwrap, "--unshare-all", "--unshare-user", "--die-with-parent", "--new-session",
                   "--hostname", "sandbox", "--ro-bind", "/usr", "/usr"]
        if self._disable_userns:
            command.append("--disable-userns")
        if Path("/usr/local/etc").is_dir():  # tools' configuration (an npmrc may hold a token)
            command += ["--size", "4096", "--tmpfs", "/usr/local/etc", "--remount-ro", "/usr/local/etc"]
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
                    "--size", str(mb), "--tmpfs", "/tmp", "--size", str(mb), "--tmpfs", "/scratch"]
        # The code arrives as data, not as a bind mount of a host directory: nothing of the host's
        # layout shows in /proc/self/mountinfo, and nothing is left on disk if the grader is killed.
        for name in ("solution.py", "guard.py"):
            command += ["--ro-bind-data", str(files[name].fileno()), f"/sandbox/{name}"]
        command += ["--seccomp", str(files["seccomp"].fileno()), "--chdir", "/scratch",
                    "--uid", "65534", "--gid", "65534", "--clearenv"]
        for key, value in self._env("/scratch").items():
            command += ["--setenv", key, value]
        return [*command, *inner]

    def _env(self, home: str) -> dict[str, str]:
        return {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": home, "PYTHONHASHSEED": "0",
                "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}

    def _lease(self) -> UidLease | None:
        if os.geteuid() != 0 or self.isolation != "bwrap":
            return None
        try:
            lease = lease_uid()
        except UidUnavailableError as exc:
            raise SandboxUnavailableError(f"no sandbox uid: {exc}") from None
        _reap_uid(lease.uid)  # a killed grader's program may still run as it
        return lease

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
        lease = self._lease()
        try:
            if self.isolation == "bwrap":
                return self._run_in(None, source, stdin, func_name, lease.uid if lease else None)
            with code_dir() as directory:
                return self._run_in(directory, source, stdin, func_name, None)
        finally:
            if lease is not None:
                lease.release()

    def _run_in(self, directory: Path | None, source: str, stdin: str, func_name: str | None,
                uid: int | None) -> RunOutcome:
        mode = "functional" if func_name else "stdin"
        with contextlib.ExitStack() as stack:
            names = ("stdin", "stdout", "stderr", "result", "solution.py", "guard.py", "seccomp")
            files: dict[str, IO[bytes]] = {name: stack.enter_context(tempfile.TemporaryFile()) for name in names}
            for name, data in (("stdin", stdin.encode("utf-8")), ("solution.py", source.encode("utf-8")),
                               ("guard.py", _GUARD.encode("utf-8")), ("seccomp", self._seccomp)):
                files[name].write(data)
                files[name].seek(0)
            result_fd = str(files["result"].fileno())
            if self.isolation == "bwrap":
                inner = [self.python, "-I", "-S", "-B", "/sandbox/guard.py", mode, func_name or "-",
                         "/sandbox/solution.py", result_fd]
                command, cwd, env = self._bwrap_command(files, inner), "/", {}
                passed = tuple(files[n].fileno() for n in ("result", "solution.py", "guard.py", "seccomp"))
            else:
                assert directory is not None
                for name in ("solution.py", "guard.py"):
                    (directory / name).write_bytes(files[name].read())
                work = directory / "work"
                work.mkdir()
                inner = [self.python, "-I", "-B", str(directory / "guard.py"), mode, func_name or "-",
                         str(directory / "solution.py"), result_fd]
                command, cwd, env = inner, str(work), self._env(str(work))
                passed = (files["result"].fileno(),)
            start = time.perf_counter()
            process, timed_out = self._launch(command, cwd, env, files, passed, uid)
            seconds = time.perf_counter() - start
            cap = self.limits.output_bytes
            stdout, stdout_size = _read_capped(files["stdout"], cap)
            stderr, _ = _read_capped(files["stderr"], STDERR_TAIL, tail=True)
            result, result_size = _read_capped(files["result"], cap) if func_name else ("", 0)
        code = process.returncode
        return RunOutcome(self._verdict(code, timed_out, seconds, max(stdout_size, result_size) >= cap),
                          stdout, stderr, code, seconds, result or None)

    def _verdict(self, code: int, timed_out: bool, seconds: float, output_full: bool) -> Status:
        """What happened, from what the harness observed: never from what the program printed."""
        # A signal shows as -N directly, or as 128+N when bubblewrap reports its child's death.
        died_of = -code if code < 0 else code - 128 if code > 128 else 0
        if timed_out or died_of == signal.SIGXCPU or (
                died_of == signal.SIGKILL and seconds >= self.limits.cpu_seconds * 0.9):
            return "timeout"
        if died_of == signal.SIGXFSZ or output_full:  # the file-size limit stopped it at the cap
            return "output_limit"
        if code == MEMORY_EXIT:
            return "memory"
        return "error" if code != 0 else "ok"

    def _launch(self, command: list[str], cwd: str, env: dict[str, str], files: dict[str, IO[bytes]],
                passed: tuple[int, ...], uid: int | None) -> tuple[subprocess.Popen[bytes], bool]:
        # The result file is handed over as an extra descriptor: stdout may hold the program's prints.
        process = subprocess.Popen(
            command, stdin=files["stdin"], stdout=files["stdout"], stderr=files["stderr"], cwd=cwd, env=env,
            close_fds=True, pass_fds=passed, start_new_session=True, preexec_fn=lambda: self._preexec(uid),
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


def _read_capped(handle: IO[bytes], limit: int, *, tail: bool = False) -> tuple[str, int]:
    """At most ``limit`` bytes of what a program wrote (the end of it with ``tail``), and its full size."""
    size = os.fstat(handle.fileno()).st_size
    handle.seek(max(0, size - limit) if tail else 0)
    return handle.read(limit).decode("utf-8", "replace"), size


def _bwrap_version(bwrap: str) -> tuple[int, ...]:
    try:
        out = subprocess.run([bwrap, "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return ()
    found = re.search(r"(\d+)\.(\d+)\.(\d+)", out)
    return tuple(int(part) for part in found.groups()) if found else ()


@contextlib.contextmanager
def code_dir() -> Iterator[Path]:
    """A private directory for one rlimits-mode run, locked while the run lasts and removed after it."""
    directory = Path(tempfile.mkdtemp(prefix=CODE_DIR_PREFIX))
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        directory.chmod(0o755)
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)
        os.close(fd)


#: A directory younger than this may be between its creation and its lock: left alone.
STALE_AFTER_SECONDS = 60.0


def remove_stale_code_dirs(parent: Path | None = None) -> list[Path]:
    """Remove the code directories of graders that were killed mid-run (nobody holds their lock)."""
    removed = []
    for directory in Path(parent or tempfile.gettempdir()).glob(f"{CODE_DIR_PREFIX}*"):
        try:
            info = directory.lstat()
            if not directory.is_dir() or directory.is_symlink() or info.st_uid != os.geteuid() or \
                    time.time() - info.st_mtime < STALE_AFTER_SECONDS:
                continue
            fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # a live run holds it
        finally:
            os.close(fd)
        shutil.rmtree(directory, ignore_errors=True)
        removed.append(directory)
    return removed


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
