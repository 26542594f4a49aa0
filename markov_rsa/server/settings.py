"""What ``rsa serve`` is configured with: the backend, the default method, the token and the limits.

Settings hold no state that requests could share; the app keeps its counters on itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from markov_rsa.backends.base import Backend
from markov_rsa.rsa.config import RSAConfig


@dataclass(frozen=True)
class ServerLimits:
    """Caps on what one client can make the server do; beyond them a request gets a 400 (or a 429
    with Retry-After when ``max_concurrent_runs`` RSA runs are already in flight)."""

    max_population: int = 64
    max_rounds: int = 16
    max_budget: int = 131_072
    max_final_n: int = 64
    max_candidate_retries: int = 3
    max_body_bytes: int = 4 * 2**20
    max_messages: int = 1024
    max_concurrent_runs: int = 16
    #: Seconds a client is told to wait when the server is at ``max_concurrent_runs``.
    retry_after: int = 2
    #: Upstream requests one run may make (generations x chunks x tries) and bytes of prompt it may
    #: send upstream: a small request must not turn into an unbounded load on the upstream.
    max_requests_per_run: int = 4096
    max_upstream_bytes_per_run: int = 64 * 2**20
    #: Seconds a client may take to send its request headers, and its body; seconds an idle
    #: keep-alive connection stays open; open connections at most (beyond: closed at once).
    header_seconds: float = 10.0
    body_seconds: float = 60.0
    idle_seconds: float = 5.0
    max_connections: int = 512


@dataclass(frozen=True)
class ServerSettings:
    """Everything the server is configured with."""

    backend: Backend
    #: The settings of extended-compute requests before a request's own fields (its task included).
    config: RSAConfig
    api_key: str | None = field(default=None, repr=False)
    model_name: str = "markov-rsa"
    limits: ServerLimits = field(default_factory=ServerLimits)
    #: Host header values accepted besides loopback names when no token is required.
    allowed_hosts: tuple[str, ...] = ()
    #: Seconds of silence after which a run sends a keep-alive (a newline before a JSON reply, an SSE
    #: comment in a stream), so clients with read timeouts above it never give up on a working run.
    heartbeat: float = 5.0
