"""The run directory's on-disk format, owned here: its version, its writer, its reader and its lock.

A run directory holds ``run.json`` (what ran: format version, task, method, backend, prompts,
package version, isolation, the data and the planned problems, provenance), ``candidates.jsonl``
(one line per graded candidate, appended and flushed as it finishes) and ``problems.jsonl`` (one
line per problem and repeat once all of it is done, or once it failed). Only one process writes a
directory at a time (``run.lock``). Readers tolerate what a kill leaves behind: a line cut short,
even inside a UTF-8 character, is skipped, and a record written twice (same problem, repeat and
attempt) counts once.

A run directory holds one run: resuming checks everything that changes a score, and its files are
never followed through symbolic links (a link planted in the directory could otherwise make a run
append to, or truncate, a file elsewhere). A directory that cannot be written (a file, read-only,
a full disk) is one error naming it; what was written before stays.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import errno
import fcntl
import json
import os
import tempfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from markov_rsa.errors import ConfigError

#: Version 2 added the format field itself, the package version, prompt fingerprints and isolation;
#: version 3 the data, the planned problems, failed-attempt records and provenance.
FORMAT_VERSION = 3
RUN_FILE, CANDIDATES_FILE, PROBLEMS_FILE, LOCK_FILE = "run.json", "candidates.jsonl", "problems.jsonl", "run.lock"

#: What must match for a directory to be resumed, and how each difference is named in the error.
IDENTITY_FIELDS = {
    "task": "task", "config": "RSA settings", "repeats": "--repeats", "backend": "backend", "model": "model",
    "prompts": "prompt set", "package_version": "markov-rsa version", "isolation": "isolation",
    "plan": "problem set", "data": "data",
}


def out_error(path: Path, exc: OSError) -> ConfigError:
    """An OS error on the run directory as one line naming it (finished records stay where they are)."""
    if exc.errno == errno.ELOOP:
        return ConfigError("out", f"{path} is a symbolic link; a run directory's files are never followed through "
                                  "links: remove it or use another --out")
    reason = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
              errno.EROFS: "it is on a read-only file system", errno.EACCES: "permission denied",
              errno.EPERM: "permission denied", errno.ENOTDIR: "a path component is a file, not a directory",
              errno.EEXIST: "it exists and is not a directory"}.get(exc.errno or 0, exc.strerror or str(exc))
    return ConfigError("out", f"cannot write {path}: {reason}; finished problems are kept, so free the space or "
                              "fix the location and run the same command again, or use another --out")


def open_nofollow(path: Path, flags: int, mode: int = 0o644) -> int:
    """``os.open`` that refuses a symbolic link (as the error from :func:`out_error`)."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    except OSError as exc:
        raise out_error(path, exc) from None


def write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` in one step (a link in its place is replaced, never followed)."""
    try:
        fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise
    except OSError as exc:
        raise out_error(path, exc) from None


def read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    """Records of a JSONL log; a line cut short by a killed writer (even mid-character) is skipped."""
    if not path.exists() and not path.is_symlink():
        return
    with os.fdopen(open_nofollow(path, os.O_RDONLY), "rb") as handle:
        for raw in handle:
            try:
                record = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                continue
            if isinstance(record, dict):
                yield record


def read_problems(path: Path) -> list[ProblemRecord]:
    """Problem records, each (problem, repeat) once: the first complete record wins; where none is
    complete (the attempt failed, or some generations failed), the latest attempt stands."""
    chosen: dict[tuple[Any, Any], ProblemRecord] = {}
    for data in read_jsonl(path):
        try:
            record = ProblemRecord.from_dict(data)
        except TypeError:  # a record without its required fields
            continue
        key = (record.problem_id, record.repeat)
        if key not in chosen or not chosen[key].complete:
            chosen[key] = record
    return list(chosen.values())


def read_candidates(path: Path, attempts: set[str] | None = None) -> list[CandidateRecord]:
    """Candidate records, each (attempt, round, index) once; only ``attempts`` when given (the
    attempts that a problem record names: a killed attempt's candidates are left out)."""
    seen: set[tuple[Any, Any, Any]] = set()
    records = []
    for data in read_jsonl(path):
        try:
            record = CandidateRecord.from_dict(data)
        except TypeError:
            continue
        key = (record.attempt, record.round, record.index)
        if key in seen or (attempts is not None and record.attempt not in attempts):
            continue
        seen.add(key)
        records.append(record)
    return records


#: Candidate texts longer than this are stored compressed (zlib, base64) under ``<field>_z``.
COMPRESS_ABOVE = 2048


def _pack(record: dict[str, Any], name: str, text: str) -> None:
    if len(text) > COMPRESS_ABOVE:
        record[f"{name}_z"] = base64.b64encode(zlib.compress(text.encode("utf-8"), 6)).decode("ascii")
    else:
        record[name] = text


def _unpack(data: dict[str, Any], name: str) -> str:
    packed = data.get(f"{name}_z")
    if isinstance(packed, str):
        try:
            inflater = zlib.decompressobj()
            raw = inflater.decompress(base64.b64decode(packed), 64 * 2**20)
            return raw.decode("utf-8", "replace")
        except (ValueError, zlib.error):
            return ""
    value = data.get(name)
    return value if isinstance(value, str) else ""


def _known(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in data.items() if k in names}


@dataclass
class CandidateRecord:
    """One graded candidate, appended to ``candidates.jsonl`` as it finishes."""

    attempt: str
    problem_id: str
    repeat: int
    round: int
    index: int
    parents: list[int] = field(default_factory=list)
    answer: str | None = None
    correct: bool = False
    finish_reason: str = "stop"
    tail: str = ""
    tail_tokens: int = 0
    completion_tokens: int = 0
    prompt_tokens: int = 0
    seconds: float = 0.0
    error: str | None = None
    #: The candidate's full answer section and reasoning (stored compressed when long).
    text: str = ""
    reasoning: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        record = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("text", "reasoning")}
        _pack(record, "text", self.text)
        _pack(record, "reasoning", self.reasoning)
        return record

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CandidateRecord:
        return cls(**{**_known(cls, data), "text": _unpack(data, "text"), "reasoning": _unpack(data, "reasoning")})


@dataclass
class ProblemRecord:
    """One problem and repeat, written to ``problems.jsonl`` once all of it is graded."""

    attempt: str
    problem_id: str
    repeat: int
    task: str
    correct: bool
    #: Per stage: the scores of ``markov_rsa.evals.metrics.RoundScore`` as dicts.
    rounds: list[dict[str, Any]] = field(default_factory=list)
    #: The last non-final stage's scores (the population).
    population: dict[str, Any] = field(default_factory=dict)
    answer: str | None = None
    gold: str | None = None
    completion_tokens: int = 0
    prompt_tokens: int = 0
    seconds: float = 0.0
    seed: int | None = None
    stop_reason: str = "complete"
    selection: str = "majority"
    #: The attempt failed (the error, shortened); it scores wrong and a resume retries it.
    error: str | None = None
    #: Generations that failed after retries (they neither count as wrong nor right; a resume retries).
    failed_generations: int = 0
    #: Every token generated, those of cancelled or failed streams included.
    generated_tokens: int = 0
    #: The stage that was scored as the population (``None``: none fit, so the problem scores wrong).
    scored_round: int | None = None

    @property
    def complete(self) -> bool:
        """Finished with every generation: nothing for a resume to redo."""
        return self.error is None and not self.failed_generations

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ProblemRecord:
        return cls(**_known(cls, data))


class JsonlWriter:
    """An append-only JSONL file, flushed per record so a killed process loses no finished line."""

    def __init__(self, path: Path) -> None:
        self.path = path
        fd = open_nofollow(path, os.O_RDWR | os.O_CREAT | os.O_APPEND)
        try:
            size = os.fstat(fd).st_size
            torn = bool(size) and os.pread(fd, 1, size - 1) != b"\n"
            self._handle: TextIO = os.fdopen(fd, "a", encoding="utf-8")
        except OSError as exc:
            os.close(fd)
            raise out_error(path, exc) from None
        if torn:  # a line cut short by a kill: end it so the next record starts clean
            self._put("\n")

    def _put(self, text: str) -> None:
        try:
            self._handle.write(text)
            self._handle.flush()
        except OSError as exc:
            raise out_error(self.path, exc) from None

    def write(self, record: dict[str, Any] | CandidateRecord | ProblemRecord) -> None:
        data = record if isinstance(record, dict) else record.to_dict()
        self._put(json.dumps(data, ensure_ascii=False) + "\n")

    def close(self) -> None:
        with contextlib.suppress(OSError):  # a full disk already reported by write
            self._handle.close()


def check_writable(out: Path) -> None:
    """Fail at once, before anything is loaded or generated, where ``out`` cannot hold a run."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise out_error(out, exc) from None
    if not out.is_dir():
        raise ConfigError("out", f"{out} is a file, not a run directory; use another --out")
    try:
        fd, probe = tempfile.mkstemp(dir=out, prefix=".write-check.")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise out_error(out, exc) from None


@contextlib.contextmanager
def locked(out: Path) -> Iterator[None]:
    """Hold the directory's lock for the body; a second writer gets a clear error at once."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise out_error(out, exc) from None
    if not out.is_dir():
        raise ConfigError("out", f"{out} is a file, not a run directory; use another --out")
    fd = open_nofollow(out / LOCK_FILE, os.O_RDWR | os.O_CREAT)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "another process"
            raise ConfigError("out", f"{out} is being written by another rsa eval (pid {holder}); wait for it "
                                     "to finish or use another --out") from None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
        except OSError as exc:
            raise out_error(out / LOCK_FILE, exc) from None
        yield
    finally:
        os.close(fd)  # closing releases the lock


def read_meta(out: Path) -> dict[str, Any] | None:
    path = out / RUN_FILE
    if not path.exists() and not path.is_symlink():
        return None
    try:
        with os.fdopen(open_nofollow(path, os.O_RDONLY), "rb") as handle:
            meta = json.loads(handle.read(16 * 2**20).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ConfigError("out", f"{path} is damaged; use a new --out") from None
    if not isinstance(meta, dict):
        raise ConfigError("out", f"{path} is not a run description; use a new --out")
    return meta


def check_resumable(out: Path, previous: dict[str, Any], identity: dict[str, Any], *, force: bool) -> None:
    """Refuse to mix runs: name the first difference and how to go on."""
    if force:
        return
    identity = json.loads(json.dumps(identity))  # compare as written: tuples are lists on disk
    version = previous.get("format", 1)
    if version > FORMAT_VERSION:
        raise ConfigError("out", f"{out} was written by a newer markov-rsa (format {version}); upgrade to resume it")
    for key, label in IDENTITY_FIELDS.items():
        if key not in previous and version < FORMAT_VERSION:
            continue  # an older format did not record it
        was, now = previous.get(key), identity.get(key)
        if was != now:
            if isinstance(was, dict) and isinstance(now, dict):  # name the setting that differs
                sub = next(k for k in sorted(set(was) | set(now)) if was.get(k) != now.get(k))
                label, was, now = f"{label} ({sub})", was.get(sub), now.get(sub)
            was, now = _short(was), _short(now)
            raise ConfigError("out", f"{out} holds a run with another {label}: {was}, this run {now}; use a "
                                     "new --out, or --force to resume it anyway")


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 120 else text[:117] + "..."
