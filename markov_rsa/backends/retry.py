"""Retry and timeout settings for remote backends, as explicit typed configuration.

A long reasoning rollout streams for many minutes, so no timeout bounds a whole generation by
default: ``Timeouts.silence`` bounds the connect and the longest gap between two streamed chunks,
and ``Timeouts.deadline`` (off by default) bounds a request end to end.
"""

from __future__ import annotations

import email.utils
import random
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class RetryPolicy:
    """How transient failures are retried. ``max_elapsed`` bounds the time one request spends
    retrying (its streaming time is not counted against it)."""

    max_attempts: int = 6
    initial_backoff: float = 0.5
    max_backoff: float = 30.0
    max_elapsed: float = 900.0
    #: How long an endpoint that failed ``eject_after`` times in a row stays out of rotation.
    cooldown: float = 30.0
    eject_after: int = 3

    def backoff(self, attempt: int, rng: random.Random) -> float:
        ceiling = min(self.max_backoff, self.initial_backoff * 2**attempt)
        return rng.uniform(ceiling / 2, ceiling)  # "equal jitter": never zero, never synchronised


@dataclass(frozen=True)
class Timeouts:
    """``silence``: seconds of silence after a stream's first byte (and for a non-streamed reply).
    ``connect``: seconds to open a connection.
    ``deadline``: seconds for a whole request, streaming included (``None``: no limit)."""

    silence: float = 600.0
    connect: float = 10.0
    deadline: float | None = None
    #: Seconds a stream may wait for its first byte (a queue or a long prefill) while the server is
    #: alive; ``None``: as long as the server answers its health check.
    first_byte: float | None = None


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (a number or an HTTP date); anything else is ignored."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        parsed = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if parsed is None:
        return None
    return max(0.0, parsed.timestamp() - time.time())
