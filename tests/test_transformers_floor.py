"""The local backend on the lowest transformers the package accepts, and refusing anything older.

A transformers whose models take the cache under another keyword runs every decode step without
its context and answers garbage without raising, so the floor in pyproject is what this test runs:
greedy tokens equal ``model.generate``, alone and in a running batch, for SmolLM2, ZAYA and
Qwen3-MoE. Where the shared environment has another release, the floor is installed once into a
cached virtual environment (``~/.cache/markov-rsa-tools``, keyed by versions).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from markov_rsa.errors import MissingDependencyError

ROOT = Path(__file__).resolve().parent.parent


def floor() -> str:
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    match = re.search(r'"transformers>=([\d.]+)"', text)
    assert match, "pyproject's local extra names a transformers floor"
    return match.group(1)


def release(version: str) -> tuple[int, ...]:
    parts = tuple(int(p) for p in re.match(r"\d+(?:\.\d+)*", version).group(0).split("."))  # type: ignore[union-attr]
    return parts + (0,) * (3 - len(parts))


def floor_python(version: str) -> str:
    """A Python with transformers ``version`` (this one where it already is)."""
    import torch
    import transformers

    if release(transformers.__version__) == release(version):
        return sys.executable
    torch_version = torch.__version__.split("+")[0]
    tools = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "markov-rsa-tools"
    venv = tools / f"transformers-{version}-torch-{torch_version}-py{sys.version_info[0]}{sys.version_info[1]}"
    python = venv / "bin" / "python"
    if (venv / ".complete").is_file():
        return str(python)
    tools.mkdir(parents=True, exist_ok=True)
    with open(tools / f"{venv.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (venv / ".complete").is_file():
            shutil.rmtree(venv, ignore_errors=True)
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
            subprocess.run([str(python), "-m", "pip", "install", "-q", f"torch=={torch_version}",
                            f"transformers=={version}", "safetensors", "numpy"], check=True, timeout=600)
            (venv / ".complete").write_text("ok", encoding="utf-8")
    return str(python)


def test_greedy_tokens_are_right_on_the_lowest_accepted_transformers(demo_dir):
    version = floor()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TRANSFORMERS_VERBOSITY": "error"}
    done = subprocess.run([floor_python(version), str(ROOT / "tests" / "floor_greedy.py"), str(demo_dir)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert release(result["transformers"]) == release(version)
    assert set(result["models"]) == {"smollm2", "tiny_zaya", "tiny_qwen_moe"}
    for name, run in result["models"].items():
        assert all(len(a) > 0 and a == r[: len(a)] for a, r in zip(run["alone"], run["reference"], strict=True)), \
            f"{name}: the backend's greedy tokens are model.generate's"
        assert run["together"] == run["alone"], f"{name}: a running batch changes no row"
        assert run["joins"] >= 1, f"{name}: rows joined a running batch"


def test_the_floor_is_one_number_and_older_releases_are_refused(monkeypatch):
    import transformers

    from markov_rsa.backends import transformers as local

    assert ".".join(map(str, local.TRANSFORMERS_FLOOR)) == floor()
    below = f"{local.TRANSFORMERS_FLOOR[0]}.{local.TRANSFORMERS_FLOOR[1] - 1}.0"
    monkeypatch.setattr(transformers, "__version__", below)
    with pytest.raises(MissingDependencyError, match=rf"transformers: .*found {below}; pip install 'transformers>="):
        local._import_torch()
    for ok in (floor(), floor() + ".0.dev0", "99.0.0rc1"):
        monkeypatch.setattr(transformers, "__version__", ok)
        local._import_torch()
