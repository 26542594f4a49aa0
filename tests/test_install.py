"""The package as a user installs it: the declared floors of the core dependencies, a core-only install,
the sdist, and the first errors a new user meets (a missing extra, markup in a message, no network).

The floors come from pyproject.toml itself (every ``name>=X`` becomes ``name==X``), so a floor that is
raised or lowered there is what this test installs. The floor environment (dependencies only) is built
once per set of floors under ~/.cache/markov-rsa-tools with pip from the package registry; the package
itself is built from this checkout with the floor setuptools and installed fresh on every run.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import tomllib

from tests.servers import FaultServer, serve_app

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("MARKOV_RSA_TOOLS_CACHE") or Path.home() / ".cache" / "markov-rsa-tools")


def floors() -> list[str]:
    """``name==floor`` for the build backend and every core dependency, read from pyproject.toml."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    declared = [*project["build-system"]["requires"], *project["project"]["dependencies"]]
    pins = []
    for requirement in declared:
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9][0-9.]*)", requirement.replace(" ", ""))
        assert match, f"{requirement!r}: declare core dependencies as name>=floor"
        pins.append(f"{match[1]}=={match[2]}")
    return pins


def floor_python() -> Path:
    """A virtual environment holding exactly the floors (and what they need), built once per set."""
    pins = floors()
    key = hashlib.sha256("\n".join([sys.version, *pins]).encode()).hexdigest()[:12]
    venv = CACHE / f"floors-{key}"
    python = venv / "bin" / "python"
    if not (venv / ".complete").exists():
        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        installed = subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                                    *pins], capture_output=True, text=True)
        assert installed.returncode == 0, f"the declared floors do not install together: {installed.stderr[-600:]}"
        (venv / ".complete").touch()
    return python


@pytest.fixture(scope="module")
def floor_env(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(the floor environment's python, the sdist built from this checkout with the floor setuptools)."""
    python = floor_python()
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md", "LICENSE", "MANIFEST.in"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "markov_rsa", source / "markov_rsa", ignore=shutil.ignore_patterns("__pycache__"))
    dist = tmp_path_factory.mktemp("dist")
    for hook in ("build_sdist", "build_wheel"):  # one process each, as a build frontend runs them
        build = f"import sys; from setuptools import build_meta; build_meta.{hook}(sys.argv[1])"
        built = subprocess.run([str(python), "-c", build, str(dist)], cwd=source, capture_output=True, text=True)
        assert built.returncode == 0, f"{hook} fails with the floor setuptools: {built.stderr[-2000:]}"
    (sdist,), (wheel,) = dist.glob("*.tar.gz"), dist.glob("*.whl")
    installed = subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                                "--no-deps", "--force-reinstall", str(wheel)], capture_output=True, text=True)
    assert installed.returncode == 0, installed.stderr[-2000:]
    return python, sdist


def rsa(python: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([str(python), "-m", "markov_rsa", *args], capture_output=True, text=True, timeout=120,
                          cwd="/", env={**clean, **(env or {})})


def one_line_error(out: subprocess.CompletedProcess[str]) -> str:
    assert out.returncode == 2, (out.returncode, out.stderr)
    assert "Traceback" not in out.stderr, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr
    return lines[0]


def test_the_sdist_ships_the_licence_and_no_half_test_suite(floor_env):
    _, sdist = floor_env
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    assert "LICENSE" in names and "markov_rsa/py.typed" in names and "markov_rsa/cli/app.py" in names
    assert not any(name.startswith("tests/") for name in names), sorted(n for n in names if n.startswith("tests"))


def test_cli_usage_errors_on_the_floor_versions(floor_env):
    python, _ = floor_env
    assert rsa(python, "--version").returncode == 0
    assert "population" in one_line_error(rsa(python, "solve", "x", "--population", "many"))
    assert "--final" in one_line_error(rsa(python, "solve", "x", "--final", "best"))
    line = one_line_error(rsa(python, "solve", "x", "--k", "5", "--population", "2", "--base-url",
                              "http://127.0.0.1:9/v1", "--model", "m"))
    assert "k: aggregation set size (5) must not exceed population (2)" in line


@pytest.mark.parametrize(("args", "extra"), [
    (["solve", "What is 2 + 2?"], "local"),
    (["solve", "What is 2 + 2?", "--model", "some/model"], "local"),
    (["serve"], "serve"),
])
def test_a_missing_extra_is_one_line_naming_it(floor_env, args, extra):
    python, _ = floor_env
    line = one_line_error(rsa(python, *args))
    assert f"pip install 'markov-rsa[{extra}]'" in line


def test_error_text_is_printed_as_text_not_markup(floor_env):
    python, _ = floor_env
    line = one_line_error(rsa(python, "solve", "x", "--backend", "[/]"))
    assert "'[/]'" in line
    line = one_line_error(rsa(python, "solve", "x", "--api-key-env", "[bold]NOT_SET[/bold]", "--base-url",
                              "http://127.0.0.1:9/v1", "--model", "m"))
    assert "[bold]NOT_SET[/bold]" in line


def test_remote_solve_on_the_floor_versions(floor_env):
    python, _ = floor_env
    server = FaultServer(reply=lambda body: "Two and two make four. The answer is \\boxed{4}.")
    with serve_app(server.app()) as url:
        out = rsa(python, "solve", "What is 2 + 2? Put the answer in \\boxed{}.", "--base-url", f"{url}/v1",
                  "--model", "fault-model", "--population", "3", "--k", "2", "--rounds", "1", "--budget", "64",
                  "--tail", "32")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "4"
    assert sum(server.answered.values()) == 6  # 3 candidates in each of 2 stages


def test_offline_hub_set_is_one_line_pointing_at_data_dir(tmp_path):
    """`rsa eval aime25` as the README shows it, without network and without a cached copy."""
    out = subprocess.run(
        [sys.executable, "-m", "markov_rsa", "eval", "aime25", "--out", str(tmp_path / "run"), "--base-url",
         "http://127.0.0.1:9/v1", "--model", "m"],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "MARKOV_RSA_DATA_DIR": ""},
    )
    line = one_line_error(out)
    assert "could not fetch" in line and "--data-dir" in line
