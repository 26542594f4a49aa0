"""The run directory's on-disk format, owned here: its version, its writer, its reader and its lock.

A run directory holds ``run.json`` (what ran: format version, task, method, backend, prompts,
package version, isolation), ``candidates.jsonl`` (one line per graded candidate, appended and
flushed as it finishes) and ``problems.jsonl`` (one line per problem and repeat once all of it is
done). Only one process writes a directory at a time (``run.lock``). Readers tolerate what a kill
leaves behind: a line cut short, even inside a UTF-8 character, is skipped, and a record written
twice (same problem, repeat and attempt) counts once.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import fcntl
import json
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from markov_rsa.errors import ConfigError

#: Version 2 added the format field itself, the package version, prompt fingerprints and isolation.
FORMAT_VERSION = 2
RUN_FILE, CANDIDATES_FILE, PROBLEMS_FILE, LOCK_FILE = "run.json", "candidates.jsonl", "problems.jsonl", "run.lock"

#: What must match for a directory to be resumed, and how each difference is named in the error.
IDENTITY_FIELDS = {
    "task": "task", "config": "RSA settings", "repeats": "--repeats", "backend": "backend", "model": "model",
    "prompts": "prompt set", "package_version": "markov-rsa version",
}


def read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    """Records of a JSONL log; a line cut short by a killed writer (even mid-character) is skipped."""
    if not path.exists():
        return
    with path.open("rb") as handle:
        for raw in handle:
            try:
                record = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                continue
            if isinstance(record, dict):
                yield record


def read_problems(path: Path) -> list[ProblemRecord]:
    """Problem records, each (problem, repeat) once: the first complete record wins."""
    seen: set[tuple[Any, Any]] = set()
    records = []
    for data in read_jsonl(path):
        try:
            record = ProblemRecord.from_dict(data)
        except TypeError:  # a record without its required fields
            continue
        key = (record.problem_id, record.repeat)
        if key not in seen:
            seen.add(key)
            records.append(record)
    return records


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

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ProblemRecord:
        return cls(**_known(cls, data))


class JsonlWriter:
    """An append-only JSONL file, flushed per record so a killed process loses no finished line."""

    def __init__(self, path: Path) -> None:
        if path.exists() and path.stat().st_size:
            with path.open("rb") as handle:
                handle.seek(-1, 2)
                torn = handle.read(1) != b"\n"
        else:
            torn = False
        self._handle: TextIO = path.open("a", encoding="utf-8")
        if torn:  # a line cut short by a kill: end it so the next record starts clean
            self._handle.write("\n")

    def write(self, record: dict[str, Any] | CandidateRecord | ProblemRecord) -> None:
        data = record if isinstance(record, dict) else record.to_dict()
        self._handle.write(json.dumps(data, ensure_ascii=False) + "\n")
        self._handle.flush()

    def close(self) -> None:
        self._handle.close()


@contextlib.contextmanager
def locked(out: Path) -> Iterator[None]:
    """Hold the directory's lock for the body; a second writer gets a clear error at once."""
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "another process"
            raise ConfigError("out", f"{out} is being written by another rsa eval (pid {holder}); wait for it "
                                     "to finish or use another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def read_meta(out: Path) -> dict[str, Any] | None:
    path = out / RUN_FILE
    if not path.exists():
        return None
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
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
