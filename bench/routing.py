"""Routing over replicas that queue: affinity against least-busy, on servers with limited slots.

Three loopback replicas (tests.servers.QueueingServer) run 2 requests at once each and queue the
rest, sending nothing until a slot frees; a prompt prefix a replica has not cached costs prefill time in proportion.
Several problems are solved at once, so affinity has reasons to pile a run onto one replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from markov_rsa import MarkovianRSA, RSAConfig
from markov_rsa.backends.openai import OpenAIBackend
from tests.servers import QueueingServer, serve_app

PROBLEMS = [f"Problem {i}: what is {i} + {i}? Think it through and answer." for i in range(4)]


async def _run(routing: str) -> dict[str, Any]:
    servers = [QueueingServer(slots=2, duration=0.5, prefill=0.3) for _ in range(3)]
    with contextlib.ExitStack() as stack:
        urls = [f"{stack.enter_context(serve_app(s.app()))}/v1" for s in servers]
        backend = OpenAIBackend(urls, model="queued-model", routing=routing)  # type: ignore[arg-type]
        await backend.ready()
        config = RSAConfig(population=6, k=2, rounds=1, budget=50, tail=10, seed=0)
        start = time.monotonic()
        await asyncio.gather(*(MarkovianRSA(backend, config).solve(p) for p in PROBLEMS))
        wall = time.monotonic() - start
        await backend.aclose()
    return {"wall": wall, "hits": sum(s.cache_hits for s in servers) / sum(s.prompt_blocks for s in servers),
            "placement": [s.served for s in servers], "queued": sum(sum(s.waits) for s in servers)}


def bench_routing() -> dict[str, Any]:
    results: dict[str, Any] = {}
    for routing in ("affinity", "least-busy"):
        runs = [asyncio.run(_run(routing)) for _ in range(2)]
        best = min(runs, key=lambda r: r["wall"])
        results[routing] = best
    return results
