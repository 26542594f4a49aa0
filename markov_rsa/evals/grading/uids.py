"""Sandbox uids, one per live program on the whole machine.

A sandboxed program runs as a uid of its own, and the run's clean-up kills everything running as
that uid; two programs sharing a uid would kill each other (and share a process limit). So a uid is
leased through a lock file per uid in a root-only directory: ``flock`` makes the lease exclusive
across threads, ``Sandbox`` objects and processes alike, and the kernel drops it when its holder
dies, however it dies. Leases start at a random uid, so that a uid just released is rarely the
next one taken (its zombies, if any, still count against its process limit).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import random
import stat
import tempfile
from pathlib import Path

#: Sandboxed programs run as uids from here on; no account uses them (nor did earlier versions, which
#: derived uids from 0x5A000000 and the pid: a grader of theirs on the same machine cannot reap ours).
UID_BASE = 0x5B000000
#: How many uids the machine's sandboxes share: at most this many programs run at once.
UID_COUNT = 4096
#: Where the lock files live (``/run``, or the temporary directory where there is none): private to
#: the harness's user, so no other process can take or fake a lease.
LOCK_DIR_NAME = "markov-rsa-sandbox-uids"


def default_lock_dir() -> Path:
    run = Path("/run")
    return (run if run.is_dir() and os.access(run, os.W_OK) else Path(tempfile.gettempdir())) / LOCK_DIR_NAME


class UidUnavailableError(Exception):
    """No uid can be leased (the lock directory is unsafe, or every uid is taken); one line says why."""


class UidLease:
    """One uid, held until :meth:`release` (or until the holding process dies)."""

    def __init__(self, uid: int, fd: int) -> None:
        self.uid = uid
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the lock
            self._fd = None

    def __enter__(self) -> UidLease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _lock_dir(path: Path) -> Path:
    try:
        with contextlib.suppress(FileExistsError):
            path.mkdir(mode=0o700, parents=False)
        info = path.lstat()
    except OSError as exc:
        raise UidUnavailableError(f"cannot make the uid lock directory {path}: {exc.strerror}") from None
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid() or info.st_mode & 0o022:
        raise UidUnavailableError(f"{path} must be a directory owned by uid {os.geteuid()} that nobody else "
                                  "can write; remove it and retry")
    return path


def lease_uid(lock_dir: Path | None = None, count: int = UID_COUNT) -> UidLease:
    """Lease a uid no other live sandbox on the machine holds."""
    directory = _lock_dir(lock_dir or default_lock_dir())
    start = random.randrange(count)
    for step in range(count):
        slot = (start + step) % count
        try:
            fd = os.open(directory / f"{slot}.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise UidUnavailableError(f"cannot open a uid lock in {directory}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        return UidLease(UID_BASE + slot, fd)
    raise UidUnavailableError(f"all {count} sandbox uids are in use; run fewer programs at once")
