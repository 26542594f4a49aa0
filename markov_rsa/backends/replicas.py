"""Replicas of one model: health, load, and which replica a request goes to.

A request with an affinity key (one run's problem) goes to the replica that rendezvous hashing
assigns that key, so the run's prompts, which all start with the same problem text, meet a warm
prefix cache there, but only while that replica queues no more than the others: where a server
says how many requests it runs at once (llama.cpp's ``total_slots``), a replica whose slots are
full spills to the next one in the key's order with a free slot, or else to the least loaded, so
affinity never leaves a replica idle while another queues. Without slot counts, a replica is
passed over once it carries ``slack`` more requests than the least busy. ``least-busy`` routing
ignores keys. Without a key, the least busy live replica is chosen. A replica
that fails ``eject_after`` times in a row leaves rotation for ``cooldown`` seconds.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from typing import Any, Literal

from markov_rsa.backends.retry import RetryPolicy

Routing = Literal["affinity", "least-busy"]

logger = logging.getLogger("markov_rsa.backends.replicas")


@dataclass
class Replica:
    url: str
    in_flight: int = 0
    consecutive_failures: int = 0
    down_until: float = 0.0
    served: int = 0
    #: Requests the server runs at once, where it says (None: unknown).
    slots: int | None = None

    @property
    def queued(self) -> int:
        """Requests a request sent there now would wait behind for a slot (0 where slots are unknown)."""
        return max(0, self.in_flight + 1 - self.slots) if self.slots is not None else 0

    @property
    def root(self) -> str:
        """The server root (tokenizer endpoints live beside /v1, not under it)."""
        return self.url[: -len("/v1")] if self.url.endswith("/v1") else self.url

    def live(self, now: float) -> bool:
        return self.down_until <= now


class ReplicaPool:
    """Chooses replicas and keeps their health; one per backend, shared by every run on it."""

    def __init__(self, urls: list[str], policy: RetryPolicy, *, routing: Routing = "affinity", slack: int = 16) -> None:
        self.replicas = [Replica(u) for u in urls]
        self.policy = policy
        self.routing = routing
        #: How many more requests in flight than the least busy replica a preferred one may carry.
        self.slack = slack

    def _ranked(self, key: str, candidates: list[Replica]) -> list[Replica]:
        def weight(replica: Replica) -> bytes:
            return hashlib.blake2b(f"{key}\x00{replica.url}".encode(), digest_size=8).digest()

        return sorted(candidates, key=weight, reverse=True)

    def pick(self, key: str | None = None, avoid: Replica | None = None) -> Replica:
        """The replica for a request; a retry goes elsewhere than ``avoid`` whenever another is live."""
        now = time.monotonic()
        live = [r for r in self.replicas if r.live(now) and r is not avoid] or [
            r for r in self.replicas if r.live(now)]
        pool = live or [min(self.replicas, key=lambda r: r.down_until)]
        least = min(pool, key=lambda r: (r.queued, r.in_flight, r.served))
        if key is None or self.routing == "least-busy" or len(pool) == 1:
            return least
        # The key's replicas in rendezvous order: the first that queues no more than the least loaded and
        # is not much busier (so an overflow, too, lands on a stable replica that warms up for this key).
        for replica in self._ranked(key, pool):
            if replica.queued <= least.queued and replica.in_flight <= least.in_flight + self.slack:
                return replica
        return least

    def succeeded(self, replica: Replica) -> None:
        if replica.down_until:
            logger.info("replica %s is back in rotation", replica.url)
        replica.consecutive_failures = 0
        replica.down_until = 0.0
        replica.served += 1

    def failed(self, replica: Replica) -> None:
        replica.consecutive_failures += 1
        if replica.consecutive_failures >= self.policy.eject_after and len(self.replicas) > 1:
            if replica.live(time.monotonic()):
                logger.warning("replica %s failed %d times in a row; out of rotation for %.0fs", replica.url,
                               replica.consecutive_failures, self.policy.cooldown)
            replica.down_until = time.monotonic() + self.policy.cooldown

    def healthy_besides(self, replica: Replica) -> bool:
        now = time.monotonic()
        return any(r is not replica and r.live(now) for r in self.replicas)

    def status(self) -> list[dict[str, Any]]:
        now = time.monotonic()
        return [{"url": r.url, "in_flight": r.in_flight, "served": r.served, "healthy": r.live(now), "slots": r.slots}
                for r in self.replicas]
