"""Benchmark problems: AIME and HMMT (MathArena's sets) and LiveCodeBench.

Users load the sets from the Hugging Face Hub (cached by huggingface_hub); ``data_dir`` (or
``$MARKOV_RSA_DATA_DIR``) reads the same sets from local JSONL files instead, which is how the
tests and offline machines run.
"""

from __future__ import annotations

import base64
import fnmatch
import io
import json
import os
import pickle
import zlib
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
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ConfigError("data_dir", f"{path}:{number} is not valid JSON ({exc.msg})") from None
    return rows


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
        problems.append(Problem(id=str(ident), task=task, problem=str(row["problem"]), answer=str(row["answer"]),
                                source=_source(row, spec.hub_id), meta={"revision": row.get("_revision")}))
    return problems


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
    return tuple(CodeTest(str(t["input"]), str(t["output"]), t.get("testtype", "stdin")) for t in items)


def lcb_problem(row: dict[str, Any]) -> Problem:
    public = row.get("public_test_cases") or "[]"
    metadata = row.get("metadata") or "{}"
    meta = json.loads(metadata) if isinstance(metadata, str) else dict(metadata)
    return Problem(
        id=str(row["question_id"]),
        task="lcb",
        problem=str(row["question_content"]),
        source=f"{row.get('platform', '')} {row.get('contest_id', '')} {row.get('question_title', '')}".strip(),
        public_tests=_tests(json.loads(public) if isinstance(public, str) else public),
        private_tests=_tests(decode_private_tests(row["private_test_cases"])) if row.get("private_test_cases") else (),
        func_name=meta.get("func_name"),
        starter_code=str(row.get("starter_code") or ""),
        meta={"contest_date": str(row.get("contest_date", "")), "difficulty": row.get("difficulty"),
              "revision": row.get("_revision"),
              "platform": row.get("platform")},
    )


def load_lcb(
    data_dir: str | Path | None = None, *, release: str = "v6", since: str | None = None, until: str | None = None,
    **options: Any,
) -> list[Problem]:
    root = data_dir_from_env(data_dir)
    if release not in LCB_RELEASES:
        raise ConfigError("release", f"unknown LiveCodeBench release {release!r}; use one of {', '.join(LCB_RELEASES)}")
    if root is not None:
        if root.is_file():
            files = [root]
        else:
            folder = root / "livecodebench" if (root / "livecodebench").is_dir() else root
            # A copy in the Hub's layout (test.jsonl, test2.jsonl...) is read by release; other files are
            # a collection of the user's own, read whole.
            hub_layout = [folder / name for name in LCB_RELEASES["v6"] if (folder / name).is_file()]
            if hub_layout:
                files = [folder / name for name in LCB_RELEASES[release] if (folder / name).is_file()]
            else:
                files = sorted(folder.glob("*.jsonl"))
        if not files:
            raise ConfigError("data_dir", f"no LiveCodeBench .jsonl files in {root}")
        rows = [row for path in files for row in _read_jsonl(path)]
    else:
        rows = _hub_rows(LCB_HUB_ID, LCB_RELEASES[release])
    problems = [lcb_problem(row) for row in rows]
    if since:
        problems = [p for p in problems if p.meta["contest_date"][:10] >= since]
    if until:
        problems = [p for p in problems if p.meta["contest_date"][:10] <= until]
    return problems


def load_task(
    task: str, data_dir: str | Path | None = None, *, release: str = "v6", since: str | None = None,
    until: str | None = None,
) -> list[Problem]:
    """The problems of a registered benchmark (``markov_rsa.evals.benchmarks``)."""
    from markov_rsa.evals.benchmarks import benchmark

    return benchmark(task).load(data_dir, release=release, since=since, until=until)
