"""Sending one request to a replica and retrying it: which replica, how long to back off, when to give up.

:class:`Router` runs an attempt on the replica :class:`~markov_rsa.backends.replicas.ReplicaPool`
picks, bounded by the backend's concurrency, and retries a :class:`Transient` failure elsewhere with
jittered exponential backoff that honours ``Retry-After``. Every retry decision is logged at debug
level under ``markov_rsa.backends.openai``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx

from markov_rsa.backends.openai.http import ClientPools, Transient, raise_for_status, transport_errors
from markov_rsa.backends.replicas import Replica, ReplicaPool
from markov_rsa.backends.retry import RetryPolicy, Timeouts
from markov_rsa.errors import BackendRequestError, BackendUnavailableError

logger = logging.getLogger("markov_rsa.backends.openai.routing")

T = TypeVar("T")


@dataclass
class Router:
    """Replicas, connection pools and the retry policy of one backend, shared by every run on it."""

    pool: ReplicaPool
    clients: ClientPools
    policy: RetryPolicy
    timeouts: Timeouts
    model: str
    #: Requests sent, retries and requests that failed for good (for /metrics and operators).
    stats: Counter[str] = field(default_factory=Counter)
    rng: random.Random = field(default_factory=random.Random, repr=False)

    async def retrying(self, attempt: Callable[[Replica], Awaitable[T]], *, key: str | None = None,
                       attempts: int | None = None, what: str = "") -> T:
        """Run ``attempt`` on a replica, retrying transient failures elsewhere with backoff."""
        policy = self.policy
        max_attempts = attempts or policy.max_attempts
        waited = 0.0
        last = "no attempt was made"
        number = 0
        failed: Replica | None = None
        for number in range(max_attempts):
            replica = self.pool.pick(key, avoid=failed)
            wait: float | None = None
            async with self.clients.semaphore():
                replica.in_flight += 1
                self.stats["requests"] += 1
                try:
                    result = await attempt(replica)
                except Transient as exc:
                    last = f"{replica.url}: {exc}"
                    failed, wait = replica, exc.retry_after
                    self.pool.failed(replica)
                except BackendRequestError:
                    self.stats["errors"] += 1
                    raise
                else:
                    self.pool.succeeded(replica)
                    return result
                finally:
                    replica.in_flight -= 1
            # The backoff counts this request's attempts on every replica: a fleet that fails everywhere
            # (an overloaded cluster) is given time, not retried at once until every replica is ejected.
            delay = wait if wait is not None else policy.backoff(number, self.rng)
            if number + 1 >= max_attempts:
                logger.debug("%s: giving up after %d attempt(s): %s", what, number + 1, last)
                break
            if waited + delay > policy.max_elapsed:
                last += f" (gave up: retrying would exceed {policy.max_elapsed:.0f}s)"
                logger.debug("%s: giving up: %s", what, last)
                break
            self.stats["retries"] += 1
            logger.debug("%s: attempt %d failed (%s); retrying in %.2fs%s", what, number + 1, last, delay,
                         " (Retry-After)" if wait is not None else "")
            waited += delay
            await asyncio.sleep(delay)
        self.stats["errors"] += 1
        raise BackendUnavailableError(f"request failed after {number + 1} attempt(s): {last}")

    async def read_slots(self) -> None:
        """How many requests each replica runs at once, where the server says (llama.cpp's /props
        ``total_slots``), so that routing can tell a full replica from a free one. Best effort."""

        async def read(replica: Replica) -> None:
            with contextlib.suppress(httpx.HTTPError, ValueError, RecursionError):
                response = await self.clients.client().client.get(replica.root + "/props",
                                                                  timeout=min(5.0, self.timeouts.silence))
                slots = response.json().get("total_slots") if response.status_code == 200 else None
                if isinstance(slots, int) and not isinstance(slots, bool) and 0 < slots <= 1_000_000:
                    replica.slots = slots

        await asyncio.gather(*(read(r) for r in self.pool.replicas))

    async def post_once(self, replica: Replica, path: str, body: dict[str, Any], *, root: bool) -> Any:
        """One POST of a JSON body; its JSON reply (a reply that is not JSON is transient)."""
        url = (replica.root if root else replica.url) + path
        shard = self.clients.client()
        shard.in_flight += 1
        deadline = self.timeouts.deadline
        try:
            with transport_errors(f"timed out after {self.timeouts.silence:.0f}s"):
                coro = shard.client.post(url, json=body)
                response = await (asyncio.wait_for(coro, deadline) if deadline else coro)
        finally:
            shard.in_flight -= 1
        raise_for_status(replica.url, path, response, self.model)
        try:
            return response.json()
        except (ValueError, RecursionError):
            raise Transient("the server sent a body that is not JSON") from None

    async def call(self, path: str, body: dict[str, Any], *, root: bool = False, attempts: int | None = None) -> Any:
        """POST a small JSON request (tokenize, detokenize, templates) with retries."""

        async def attempt(replica: Replica) -> Any:
            return await self.post_once(replica, path, body, root=root)

        return await self.retrying(attempt, attempts=attempts, what=path)
