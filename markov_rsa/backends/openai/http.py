"""HTTP plumbing shared by every request to an OpenAI-compatible server: connection pools, and the
one mapping from httpx failures and HTTP statuses to what the caller does next.

A transient failure (a timeout, a dropped connection, 408/409/425/429/5xx, a body that cannot be
read) is a :class:`Transient`, which the router retries elsewhere; a request that cannot succeed is
a typed :mod:`markov_rsa.errors` error with a message that says what to fix. The API key travels
only as a header of the pooled clients.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import httpx

from markov_rsa.backends.retry import parse_retry_after
from markov_rsa.errors import AuthenticationError, BackendRequestError, ModelNotFoundError

RETRY_STATUSES = frozenset({408, 409, 425, 429})
#: Connections per httpx pool; more concurrency is spread over several pools.
SHARD_CONNECTIONS = 32


class Transient(Exception):
    """A failure that another attempt (on this replica or another) may not meet."""

    def __init__(self, message: str, retry_after: float | None = None, spent: int = 0,
                 timed_out: bool = False) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        #: Tokens the failed attempt had already streamed (paid for, thrown away).
        self.spent = spent
        #: The attempt ran out of time (rather than being refused or cut).
        self.timed_out = timed_out


def server_message(response: httpx.Response) -> str:
    """The server's own error message from a reply body, bounded."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:200].strip()
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict):
            return str(err.get("message") or err.get("detail") or err)[:300]
        return str(body.get("detail") or body.get("message") or err)[:300]
    return str(body)[:300]


def transient_status(response: httpx.Response) -> None:
    """Raise :class:`Transient` for a status worth retrying (honouring Retry-After)."""
    status = response.status_code
    if status in RETRY_STATUSES or status >= 500:
        raise Transient(f"HTTP {status}: {server_message(response)}",
                        parse_retry_after(response.headers.get("retry-after")))


def raise_for_status(url: str, path: str, response: httpx.Response, model: str) -> None:
    """Map a reply's status: transient ones retried, the rest a typed error saying what to fix."""
    transient_status(response)
    status = response.status_code
    if status in (401, 403):
        raise AuthenticationError(f"{url} rejected the API key (HTTP {status}); check the key (--api-key-env)", status)
    if status == 404:
        detail = server_message(response)
        hint = (f"the server does not serve model {model!r}" if "model" in detail.lower()
                else f"no such path {path} (base URLs usually end in /v1)")
        raise ModelNotFoundError(f"{url}: HTTP 404, {hint}: {detail}", status)
    if status >= 400:
        raise BackendRequestError(f"{url} refused the request (HTTP {status}): {server_message(response)}", status)


@contextlib.contextmanager
def transport_errors(timeout_message: str, spent: Callable[[], int] = lambda: 0) -> Iterator[None]:
    """The one mapping of httpx's failures (and a deadline's ``asyncio.TimeoutError``) to :class:`Transient`."""
    try:
        yield
    except (httpx.TimeoutException, asyncio.TimeoutError):
        raise Transient(timeout_message, spent=spent(), timed_out=True) from None
    except httpx.TransportError as exc:
        raise Transient(f"connection failed ({type(exc).__name__})", spent=spent()) from None


@dataclass
class Shard:
    client: httpx.AsyncClient
    in_flight: int = 0


@dataclass
class ClientPools:
    """httpx pools and the concurrency bound, one set per event loop (a backend may outlive a loop)."""

    max_concurrency: int
    timeout: httpx.Timeout
    api_key: str | None = field(default=None, repr=False)
    transport: httpx.AsyncBaseTransport | None = field(default=None, repr=False)
    _clients: dict[int, list[Shard]] = field(default_factory=dict, repr=False)
    _semaphores: dict[int, asyncio.Semaphore] = field(default_factory=dict, repr=False)

    def _new_client(self, connections: int) -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        return httpx.AsyncClient(
            headers=headers,
            timeout=self.timeout,
            limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections),
            transport=self.transport,
        )

    def client(self) -> Shard:
        """The least busy connection pool of this event loop.

        httpcore's pool does work proportional to its queued requests times its connections on
        every event, which turns quadratic with a thousand requests in flight; several small pools
        keep each one short.
        """
        loop = id(asyncio.get_running_loop())
        shards = self._clients.get(loop)
        if shards is None or any(shard.client.is_closed for shard in shards):
            count = max(1, -(-self.max_concurrency // SHARD_CONNECTIONS))
            size = min(self.max_concurrency, SHARD_CONNECTIONS)
            shards = [Shard(self._new_client(size)) for _ in range(count)]
            self._clients[loop] = shards
        return min(shards, key=lambda shard: shard.in_flight)

    def semaphore(self) -> asyncio.Semaphore:
        loop = id(asyncio.get_running_loop())
        if loop not in self._semaphores:
            self._semaphores[loop] = asyncio.Semaphore(self.max_concurrency)
        return self._semaphores[loop]

    async def aclose(self) -> None:
        loops, self._clients = list(self._clients.values()), {}
        for shards in loops:
            for shard in shards:
                with contextlib.suppress(RuntimeError):  # its loop is gone; nothing left to release
                    await shard.client.aclose()
