"""A loopback OpenAI-compatible server that answers after a scripted delay, run as its own process
so that the benchmark's CPU time is the engine's alone.

    python -m bench.delay_server PORT DELAYS.json

DELAYS.json maps request seeds to seconds ("default" for the rest).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import uvicorn

from tests.servers import FaultServer


def main() -> None:
    port, delays_file = int(sys.argv[1]), Path(sys.argv[2])
    delays = json.loads(delays_file.read_text())
    default = float(delays.pop("default", 0.0))
    table = {int(seed): float(value) for seed, value in delays.items()}
    server = FaultServer(delay=lambda body: table.get(body.get("seed", -1), default))
    uvicorn.run(server.app(), host="127.0.0.1", port=port, log_level="critical", backlog=4096,
                limit_concurrency=100000)


if __name__ == "__main__":
    main()
