"""``make sample-report``: docs/sample-report/, what ``rsa report`` makes of real runs, for newcomers.

Two ``rsa eval`` runs on six AIME 2025 problems (one rollout against Markovian RSA N4 K2 T1) against a
loopback server whose scripted answers are right for some seeds and wrong for others, then
``rsa report`` on both, with the what-if of consensus early exit at 0.5, 0.75 and 1.0. The numbers
say nothing about any model; the layout is the point.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.servers import FaultServer, serve_app  # noqa: E402


def reply(body: dict) -> str:
    seed = int(body.get("seed", 1))
    prompt = str(body.get("messages", [{}])[-1].get("content", ""))
    right = seed % 3 != 0 if "candidate solutions" in prompt else seed % 2 == 0
    return "Working through the problem step by step. " * 20 + ("\\boxed{70}" if right else f"\\boxed{{{seed % 50}}}")


def main() -> None:
    out = ROOT / "docs" / "sample-report"
    data = ROOT.parent / "shared" / "datasets"
    with tempfile.TemporaryDirectory() as tmp, serve_app(FaultServer(reply=reply).app()) as url:
        runs = []
        for name, flags in (("single-rollout", ["--preset", "parallel", "--population", "1"]),
                            ("markovian-rsa", ["--population", "4", "--k", "2", "--rounds", "1"])):
            run = Path(tmp) / name
            subprocess.run([sys.executable, "-m", "markov_rsa", "eval", "aime25", "--out", str(run), "--data-dir",
                            str(data), "--base-url", f"{url}/v1", "--model", "scripted-server", "--limit", "6",
                            "--budget", "2000", "--tail", "64", "--seed", "1", "--name", name, *flags],
                           check=True, cwd=ROOT)
            runs.append(str(run))
        if out.exists():
            shutil.rmtree(out)
        subprocess.run([sys.executable, "-m", "markov_rsa", "report", *runs, "--out", str(out),
                        "--early-exit", "0.5", "0.75", "1.0"], check=True, cwd=ROOT)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
