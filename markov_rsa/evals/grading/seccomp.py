"""The system calls a sandboxed program may not make, as a seccomp filter bubblewrap installs.

A contest program reads stdin, computes (in threads at most) and writes stdout. Everything below is
kernel surface it never needs and an attacker would: new processes (so the memory limit on one
address space bounds the program's total), namespaces (a nested uid 0 with capabilities), tracing
other processes, io_uring, the kernel keyring, mounts, BPF, perf, modules, and sockets other than
AF_UNIX. Denied calls fail with EPERM (``clone3`` with ENOSYS, so that the C library falls back to
``clone``, whose flags the filter can read, to start a thread). The filter is built with libseccomp
(through ``pyseccomp``) and exported as BPF for ``bwrap --seccomp FD``; where that cannot be done
the sandbox refuses to run.
"""

from __future__ import annotations

import errno
import socket
import tempfile
from typing import Any

#: Denied outright (EPERM): name -> why a contest program never needs it.
DENIED: dict[str, str] = {
    "fork": "a new process", "vfork": "a new process",
    "unshare": "new namespaces", "setns": "entering namespaces",
    "ptrace": "tracing another process", "process_vm_readv": "reading another process",
    "process_vm_writev": "writing another process", "kcmp": "comparing other processes' resources",
    "pidfd_getfd": "taking another process's descriptor",
    "io_uring_setup": "io_uring", "io_uring_enter": "io_uring", "io_uring_register": "io_uring",
    "keyctl": "the kernel keyring", "add_key": "the kernel keyring", "request_key": "the kernel keyring",
    "mount": "mounting", "umount2": "mounting", "pivot_root": "mounting", "chroot": "mounting",
    "open_tree": "mounting", "move_mount": "mounting", "fsopen": "mounting", "fsconfig": "mounting",
    "fsmount": "mounting", "fspick": "mounting", "mount_setattr": "mounting",
    "bpf": "BPF programs", "perf_event_open": "performance counters", "userfaultfd": "user page faults",
    "memfd_create": "memory outside the address-space limit", "memfd_secret": "memory outside the limit",
    "kexec_load": "the kernel", "kexec_file_load": "the kernel", "init_module": "the kernel",
    "finit_module": "the kernel", "delete_module": "the kernel", "reboot": "the machine",
    "swapon": "the machine", "swapoff": "the machine", "acct": "the machine", "quotactl": "the machine",
    "syslog": "the kernel log", "name_to_handle_at": "file handles", "open_by_handle_at": "file handles",
    "iopl": "I/O ports", "ioperm": "I/O ports", "settimeofday": "the clock", "clock_settime": "the clock",
    "clock_adjtime": "the clock", "adjtimex": "the clock", "sethostname": "the host name",
    "setdomainname": "the host name", "uselib": "obsolete", "personality": "execution domains",
    "fanotify_init": "watching the filesystem", "lookup_dcookie": "profiling",
}
#: ``clone`` starts a thread only with CLONE_THREAD and never with a namespace flag.
CLONE_THREAD = 0x00010000
CLONE_NAMESPACES = {"CLONE_NEWNS": 0x00020000, "CLONE_NEWCGROUP": 0x02000000, "CLONE_NEWUTS": 0x04000000,
                    "CLONE_NEWIPC": 0x08000000, "CLONE_NEWUSER": 0x10000000, "CLONE_NEWPID": 0x20000000,
                    "CLONE_NEWNET": 0x40000000}
#: ioctls that push input into a terminal another process reads.
DENIED_IOCTLS = {"TIOCSTI": 0x5412, "TIOCLINUX": 0x541C}


class SeccompUnavailableError(Exception):
    """The filter cannot be built here (no libseccomp); the message says why, in one line."""


def _build() -> Any:
    try:
        import pyseccomp as sc
    except (ImportError, RuntimeError, OSError) as exc:  # pyseccomp raises RuntimeError without libseccomp
        raise SeccompUnavailableError(f"no seccomp filter: {exc} (install libseccomp2 and pyseccomp)") from None
    rules = sc.SyscallFilter(sc.ALLOW)
    eperm = sc.ERRNO(errno.EPERM)
    for name in DENIED:
        if sc.resolve_syscall(sc.system_arch(), name) < 0:
            continue  # unknown to libseccomp on this architecture: there is no such call to deny
        rules.add_rule(eperm, name)
    rules.add_rule(sc.ERRNO(errno.ENOSYS), "clone3")
    rules.add_rule(eperm, "clone", sc.Arg(0, sc.MASKED_EQ, CLONE_THREAD, 0))
    for flag in CLONE_NAMESPACES.values():
        rules.add_rule(eperm, "clone", sc.Arg(0, sc.MASKED_EQ, flag, flag))
    rules.add_rule(eperm, "socket", sc.Arg(0, sc.NE, socket.AF_UNIX))
    for request in DENIED_IOCTLS.values():
        rules.add_rule(eperm, "ioctl", sc.Arg(1, sc.MASKED_EQ, 0xFFFFFFFF, request))
    return rules


def _export(how: str) -> bytes:
    try:
        rules = _build()
        with tempfile.TemporaryFile() as out:
            getattr(rules, how)(out)
            out.seek(0)
            return out.read()
    except (OSError, ValueError, RuntimeError) as exc:
        raise SeccompUnavailableError(f"the seccomp filter could not be built: {exc}") from None


def program_filter() -> bytes:
    """The filter as BPF, ready for ``bwrap --seccomp``."""
    bpf = _export("export_bpf")
    if not bpf or len(bpf) % 8:
        raise SeccompUnavailableError(f"the seccomp filter came out malformed ({len(bpf)} bytes)")
    return bpf


def describe() -> str:
    """The filter in libseccomp's pseudo-code, for people and tests to read."""
    return _export("export_pfc").decode()
