"""Benchmark problems: AIME and HMMT (MathArena's sets) and LiveCodeBench.

Users load the sets from the Hugging Face Hub (cached by huggingface_hub); ``data_dir`` (or
``$MARKOV_RSA_DATA_DIR``) reads the same sets from local JSONL files instead, which is how the
tests and offline machines run. Loading sits below the benchmark registry
(:mod:`markov_rsa.evals.benchmarks`), which names these loaders; nothing here imports it back.

A row that lacks a field or holds the wrong type is one error naming the file, the row and the
field; a set whose ids repeat is refused, naming the ids (a repeated id would silently merge two
problems in every report).
"""

from __future__ import annotations

import base64
import datetime
import fnmatch
import hashlib
import io
import json
import os
import pickle
import re
import zlib
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from markov_rsa.errors import ConfigError, DatasetUnavailableError, MissingDependencyError

TestType = Literal["stdin", "functional"]


@dataclass(frozen=True)
class CodeTest:
    input: str
    output: str
    testtype: TestType


@dataclass(frozen=True)
class Problem:
    id: str
    task: str
    problem: str
    answer: str | None = None
    source: str = ""
    #: Code problems: tests shown to the model (public) and held out (private), and the entry point.
    public_tests: tuple[CodeTest, ...] = ()
    private_tests: tuple[CodeTest, ...] = ()
    func_name: str | None = None
    starter_code: str = ""
    meta: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def kind(self) -> Literal["math", "code"]:
        return "code" if self.task.startswith("lcb") else "math"

    @property
    def integer_answers(self) -> bool:
        """AIME answers are integers 0-999 and are graded as integers."""
        return self.task in MATH_SETS and MATH_SETS[self.task].integer_answers


@dataclass(frozen=True)
class MathSet:
    file: str
    hub_id: str
    integer_answers: bool


MATH_SETS: dict[str, MathSet] = {
    "aime24": MathSet("aime_2024.jsonl", "MathArena/aime_2024", True),
    "aime25": MathSet("aime_2025.jsonl", "MathArena/aime_2025", True),
    "aime26": MathSet("aime_2026.jsonl", "MathArena/aime_2026", True),
    "hmmt24": MathSet("hmmt_feb_2024.jsonl", "MathArena/hmmt_feb_2024", False),
    "hmmt25": MathSet("hmmt_feb_2025.jsonl", "MathArena/hmmt_feb_2025", False),
    "hmmt26": MathSet("hmmt_feb_2026.jsonl", "MathArena/hmmt_feb_2026", False),
}
LCB_HUB_ID = "livecodebench/code_generation_lite"
#: Releases of LiveCodeBench's code_generation_lite and the files each one spans.
LCB_RELEASES = {f"v{i}": [("test.jsonl" if j == 1 else f"test{j}.jsonl") for j in range(1, i + 1)] for i in range(1, 7)}


def data_dir_from_env(data_dir: str | Path | None) -> Path | None:
    value = data_dir or os.environ.get("MARKOV_RSA_DATA_DIR")
    if not value:
        return None
    path = Path(value).expanduser()
    if not path.exists():
        raise ConfigError("data_dir", f"{path} does not exist")
    return path


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ConfigError("data_dir", f"{path}:{number} is not valid JSON ({exc.msg})") from None
                if not isinstance(row, dict):
                    raise ConfigError("data_dir", f"{path}:{number} is not a JSON object")
                row[WHERE] = f"{path}:{number}"
                rows.append(row)
    return rows


#: The key under which a row remembers its file and line (for errors that name the row).
WHERE = "_where"


def file_digests(paths: Iterable[Path]) -> dict[str, str]:
    """sha256 of each local data file read, so a run records exactly which copy it graded against."""
    digests = {}
    for path in paths:
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        digests[str(path)] = digest.hexdigest()
    return digests


def problems_digest(problems: Iterable[Problem]) -> str:
    """One sha256 over what grading depends on (ids, statements, answers, tests), in load order."""
    digest = hashlib.sha256()
    for p in problems:
        digest.update(json.dumps([p.id, p.task, p.problem, p.answer, p.func_name, p.starter_code,
                                  [[t.input, t.output, t.testtype] for t in p.public_tests + p.private_tests]],
                                 ensure_ascii=False).encode("utf-8"))
    return digest.hexdigest()


def _field(row: dict[str, Any], name: str, index: int, default: Any = ...) -> Any:
    if name in row and row[name] is not None:
        return row[name]
    if default is not ...:
        return default
    raise ConfigError("data", f"{_where(row, index)}: the row has no {name!r} field")


def _where(row: dict[str, Any], index: int) -> str:
    return str(row.get(WHERE) or f"row {index + 1}")


def refuse_duplicates(problems: list[Problem], what: str) -> list[Problem]:
    """A set whose ids repeat would merge distinct problems in every table: refuse it, naming them."""
    repeated = sorted(pid for pid, n in Counter(p.id for p in problems).items() if n > 1)
    if repeated:
        shown = ", ".join(repeated[:10]) + (f" and {len(repeated) - 10} more" if len(repeated) > 10 else "")
        raise ConfigError("data", f"{what} has duplicate problem ids: {shown}; fix the data so every id is unique")
    return problems


def parse_date(value: str, field_name: str) -> datetime.date:
    """``YYYY-MM-DD`` (single-digit month and day accepted), compared as a date, never as text."""
    match = re.fullmatch(r"\s*(\d{4})-(\d{1,2})-(\d{1,2})(?:[T ].*)?\s*", value)
    try:
        if match is None:
            raise ValueError
        return datetime.date(int(match[1]), int(match[2]), int(match[3]))
    except ValueError:
        raise ConfigError(field_name, f"{value!r} is not a date; use YYYY-MM-DD") from None


def _hub_rows(repo_id: str, patterns: list[str], revision: str | None = None) -> list[dict[str, Any]]:
    """Rows of a Hub dataset snapshot; each row's ``_revision`` is the commit it came from (the snapshot
    folder's name), so a run records exactly which data it graded against."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise MissingDependencyError(
            "loading benchmark sets from the Hugging Face Hub needs huggingface-hub and pyarrow: "
            "pip install 'markov-rsa[hub]', or pass --data-dir with local JSONL copies"
        ) from None
    try:
        local = Path(snapshot_download(repo_id, repo_type="dataset", allow_patterns=patterns, revision=revision))
    except Exception as exc:  # offline, no cached copy, a proxy, a gated or moved set: all mean "not fetched"
        raise DatasetUnavailableError(
            f"could not fetch {repo_id} from the Hugging Face Hub ({type(exc).__name__}); check the network, "
            "or point --data-dir (or MARKOV_RSA_DATA_DIR) at local JSONL copies"
        ) from None
    rows: list[dict[str, Any]] = []
    # The snapshot folder can hold more than was asked for (files cached earlier), so filter again.
    wanted = [p for p in sorted(local.rglob("*")) if any(fnmatch.fnmatch(p.relative_to(local).as_posix(), pat)
                                                         or fnmatch.fnmatch(p.name, pat) for pat in patterns)]
    for path in wanted:
        if path.suffix == ".jsonl":
            rows.extend(_read_jsonl(path))
        elif path.suffix == ".parquet":
            import pyarrow.parquet as pq

            rows.extend(pq.read_table(path).to_pylist())
    for row in rows:
        row["_revision"] = local.name
    return rows


def _source(row: dict[str, Any], hub_id: str) -> str:
    revision = row.get("_revision")
    return f"{hub_id}@{revision}" if revision else str(row.get("source", hub_id))


def load_math(task: str, data_dir: str | Path | None = None) -> list[Problem]:
    spec = MATH_SETS[task]
    root = data_dir_from_env(data_dir)
    if root is not None:
        candidates = [root / spec.file, root / "math" / spec.file]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            raise ConfigError("data_dir", f"no {spec.file} in {root} or {root / 'math'}")
        rows = _read_jsonl(path)
    else:
        rows = _hub_rows(spec.hub_id, ["*.parquet", "*.jsonl"])
    problems = []
    for i, row in enumerate(rows):
        ident = row.get("id") or f"{task}_{row.get('problem_idx', i + 1)}"
        problems.append(Problem(id=str(ident), task=task, problem=str(_field(row, "problem", i)),
                                answer=str(_field(row, "answer", i)), source=_source(row, spec.hub_id),
                                meta={"revision": row.get("_revision"), "file": row.get(WHERE, "").rsplit(":", 1)[0]}))
    return refuse_duplicates(problems, f"{task} ({root or spec.hub_id})")


#: The most one problem's private tests may decompress to (the largest LiveCodeBench rows are tens of MiB).
MAX_PRIVATE_TESTS_BYTES = 512 * 2**20


class _NoGlobals(pickle.Unpickler):
    """Private tests are pickled strings; anything that names a global is refused, not executed."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")


def decode_private_tests(blob: str) -> list[dict[str, Any]]:
    """LiveCodeBench private tests: plain JSON, or base64 of zlib of a pickled JSON string."""
    try:
        return list(json.loads(blob))
    except (json.JSONDecodeError, TypeError):
        pass
    inflater = zlib.decompressobj()
    raw = inflater.decompress(base64.b64decode(blob), MAX_PRIVATE_TESTS_BYTES + 1)
    if len(raw) > MAX_PRIVATE_TESTS_BYTES or inflater.unconsumed_tail:
        raise ConfigError("data", f"private tests decompress to more than {MAX_PRIVATE_TESTS_BYTES // 2**20} MiB; "
                                  "refusing them (a damaged or hostile dataset row)")
    value = _NoGlobals(io.BytesIO(raw)).load()
    return list(json.loads(value) if isinstance(value, (str, bytes)) else value)


def _tests(items: Iterable[dict[str, Any]]) -> tuple[CodeTest, ...]:
    tests = []
    for t in items:
        kind = t.get("testtype", "stdin")
        if kind not in ("stdin", "functional"):
            raise ValueError(f"testtype {kind!r} is neither 'stdin' nor 'functional'")
        tests.append(CodeTest(str(t["input"]), str(t["output"]), kind))
    return tuple(tests)


def lcb_problem(row: dict[str, Any], index: int = 0) -> Problem:
    """One LiveCodeBench row; a missing or malformed field is one error naming the row and the field."""
    name = "metadata"
    try:
        metadata = row.get("metadata") or "{}"
        meta = json.loads(metadata) if isinstance(metadata, str) else dict(metadata)
        name = "public_test_cases"
        public = row.get("public_test_cases") or "[]"
        public_tests = _tests(json.loads(public) if isinstance(public, str) else public)
        name = "private_test_cases"
        private_tests = _tests(decode_private_tests(row["private_test_cases"])) if row.get("private_test_cases") \
            else ()
    except ConfigError:
        raise
    except (ValueError, TypeError, KeyError, AttributeError, EOFError, pickle.UnpicklingError, zlib.error) as exc:
        raise ConfigError("data", f"{_where(row, index)}: field {name!r} is malformed "
                                  f"({type(exc).__name__}: {str(exc)[:80]})") from None
    return Problem(
        id=str(_field(row, "question_id", index)),
        task="lcb",
        problem=str(_field(row, "question_content", index)),
        source=f"{row.get('platform', '')} {row.get('contest_id', '')} {row.get('question_title', '')}".strip(),
        public_tests=public_tests,
        private_tests=private_tests,
        func_name=meta.get("func_name"),
        starter_code=str(row.get("starter_code") or ""),
        meta={"contest_date": str(row.get("contest_date") or ""), "difficulty": row.get("difficulty"),
              "revision": row.get("_revision"), "file": str(row.get(WHERE, "")).rsplit(":", 1)[0],
              "where": _where(row, index), "platform": row.get("platform")},
    )


def load_lcb(
    data_dir: str | Path | None = None, *, release: str | None = None, since: str | None = None,
    until: str | None = None, **options: Any,
) -> list[Problem]:
    """LiveCodeBench problems: ``release`` picks the files of the Hub's layout (default v6), ``since`` and
    ``until`` bound the contest date (compared as dates). Either option where it cannot apply is an error."""
    root = data_dir_from_env(data_dir)
    if release is not None and release not in LCB_RELEASES:
        raise ConfigError("release", f"unknown LiveCodeBench release {release!r}; use one of {', '.join(LCB_RELEASES)}")
    first = parse_date(since, "since") if since else None
    last = parse_date(until, "until") if until else None
    if first and last and first > last:
        raise ConfigError("since", f"--since {since} is after --until {until}")
    chosen = release or "v6"
    if root is not None:
        if root.is_file():
            files, hub_layout = [root], False
        else:
            folder = root / "livecodebench" if (root / "livecodebench").is_dir() else root
            # A copy in the Hub's layout (test.jsonl, test2.jsonl...) is read by release; other files are
            # a collection of the user's own, read whole.
            hub_layout = any((folder / name).is_file() for name in LCB_RELEASES["v6"])
            if hub_layout:
                files = [folder / name for name in LCB_RELEASES[chosen] if (folder / name).is_file()]
            else:
                files = sorted(folder.glob("*.jsonl"))
        if release is not None and not hub_layout:
            raise ConfigError("release", f"{root} is not in the Hub's layout (test.jsonl, test2.jsonl, ...), so "
                                         "--release cannot select from it; drop --release")
        if not files:
            raise ConfigError("data_dir", f"no LiveCodeBench .jsonl files in {root}")
        rows = [row for path in files for row in _read_jsonl(path)]
    else:
        rows = _hub_rows(LCB_HUB_ID, LCB_RELEASES[chosen])
    problems = [lcb_problem(row, i) for i, row in enumerate(rows)]
    if first or last:
        kept = []
        for p in problems:
            text = str(p.meta.get("contest_date") or "")
            if not text:
                raise ConfigError("since" if first else "until", f"{p.meta['where']}: no contest_date to filter on")
            day = parse_date(text, f"data ({p.meta['where']} contest_date)")
            if (first is None or day >= first) and (last is None or day <= last):
                kept.append(p)
        problems = kept
    return refuse_duplicates(problems, f"lcb ({root or LCB_HUB_ID})")
