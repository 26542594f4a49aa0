"""A vLLM-like loopback server (tests.servers.VLLMLike) in its own process, streaming at a set rate,
so that a benchmark's timings are the client's alone.

    python -m bench.stream_server PORT TOKENS_PER_SECOND REASONING_TOKENS
"""

from __future__ import annotations

import sys

import uvicorn

from tests.servers import VLLMLike


def main() -> None:
    port, rate, length = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])

    def output(prompt: str, body: dict) -> str:
        return "r" * length + "</think>The answer is \\boxed{7}."

    server = VLLMLike(output, token_rate=rate)
    uvicorn.run(server.app(), host="127.0.0.1", port=port, log_level="critical", backlog=4096)


if __name__ == "__main__":
    main()
