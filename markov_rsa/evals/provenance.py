"""Where a run's numbers came from, recorded in ``run.json`` so that a table can be traced and re-run.

The command line (credentials removed), the package version and the git commit it was run from,
the versions of the grading libraries, the endpoint (without credentials) and what the model server
says it is, and a checksum of every local data file read. Each item is best effort: what cannot be
found is recorded as ``None``, never guessed, and looking never fails a run.
"""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from markov_rsa import __version__
from markov_rsa.backends.base import BackendInfo
from markov_rsa.evals.datasets import Problem, file_digests

#: Flags whose value is a secret (none of rsa's flags carry one, but a user may pass a URL with one).
_SECRET_QUERY = re.compile(r"(?i)([?&](?:api[_-]?key|key|token|access_token|sig|signature)=)[^&\s]+")


def strip_credentials(text: str) -> str:
    """A URL (or an argument holding one) without user, password or key-like query values."""
    def clean(match: re.Match[str]) -> str:
        url = match.group(0)
        try:
            parts = urlsplit(url)
        except ValueError:
            return "<url>"
        host = parts.hostname or ""
        if parts.port:
            host = f"{host}:{parts.port}"
        return _SECRET_QUERY.sub(r"\1<removed>", urlunsplit(parts._replace(netloc=host)))

    return re.sub(r"[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"]+", clean, text)


def git_commit(path: Path | None = None) -> str | None:
    """The commit of the checkout the package runs from (``None`` for an installed wheel)."""
    root = path or Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5, check=False)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = out.stdout.strip()
    if out.returncode != 0 or not re.fullmatch(r"[0-9a-f]{40}", commit):
        return None
    return commit + ("+dirty" if dirty.stdout.strip() else "")


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def provenance(command: Sequence[str], info: BackendInfo, problems: Iterable[Problem],
               data: Mapping[str, Any]) -> dict[str, Any]:
    files = sorted({str(p.meta["file"]) for p in problems if p.meta.get("file")})
    extra = info.extra or {}
    endpoints = [strip_credentials(str(url)) for url in extra.get("endpoints", [])]
    return {
        "command": [strip_credentials(arg) for arg in command],
        "package_version": __version__,
        "git_commit": git_commit(),
        "math_verify_version": _version("math-verify"),
        "endpoints": endpoints,
        "server": {key: extra[key] for key in ("server", "server_version") if key in extra} or None,
        "data_dir": str(Path(str(data["data_dir"])).resolve()) if data.get("data_dir") else None,
        "data_files": file_digests(Path(f) for f in files if Path(f).is_file()),
    }
