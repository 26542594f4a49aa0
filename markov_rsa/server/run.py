"""Running the app with uvicorn, hardened against slow and greedy clients.

uvicorn bounds the idle time between requests (``idle_seconds``) but not the time a client may take
to send its headers, nor the number of open connections: a few thousand half-sent requests would
hold every file descriptor and ``/health`` would stop answering. :class:`GuardedH11Protocol` closes
a connection whose headers are not complete within ``header_seconds`` and refuses connections beyond
``max_connections`` at once; the app bounds the body's time itself (``body_seconds``). Repeated
failures (refused connections, ``accept()`` out of descriptors) are logged once per cause.

SIGTERM (and Ctrl-C) stop accepting connections, let runs in flight finish for ``drain_seconds``,
then cancel what is left (each cancelled run releases its upstream connections).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from markov_rsa.errors import ConfigError
from markov_rsa.server.settings import ServerLimits

logger = logging.getLogger("markov_rsa.server.connections")


class OncePerCause(logging.Filter):
    """Let each distinct message template through once; repeats are dropped (a flood of identical
    tracebacks would fill the disk while helping no one)."""

    def __init__(self) -> None:
        super().__init__()
        self._seen: set[tuple[str, str]] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, str(record.msg))
        if key in self._seen:
            return False
        self._seen.add(key)
        return True


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a header deadline and a connection cap (set on a subclass by
    :func:`guarded_protocol`)."""

    header_seconds: float = 10.0
    max_connections: int = 512

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            logger.warning("refusing connections beyond %d open ones (rsa serve --max-connections)",
                           self.max_connections)
            transport.abort()
            return
        self._arm()

    def _arm(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_seconds, self._headers_too_slow)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            logger.info("closing connections whose request headers take longer than %.0fs", self.header_seconds)
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self.conn.their_state is h11.IDLE:
            self._arm()  # a new request has begun: its headers have header_seconds from here
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:
            self._disarm()

    def on_response_complete(self) -> None:
        self._disarm()  # the idle keep-alive timer takes over until the next request's first byte
        super().on_response_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)


def guarded_protocol(limits: ServerLimits) -> type[GuardedH11Protocol]:
    return type("GuardedH11", (GuardedH11Protocol,), {"header_seconds": limits.header_seconds,
                                                      "max_connections": limits.max_connections})


def uvicorn_config(app: Any, limits: ServerLimits, *, host: str = "127.0.0.1", port: int = 0,
                   drain_seconds: float = 30.0, log_level: str = "warning") -> uvicorn.Config:
    """The uvicorn configuration ``rsa serve`` runs with (tests run the same)."""
    return uvicorn.Config(app, host=host, port=port, http=guarded_protocol(limits), lifespan="off",
                          timeout_keep_alive=max(1, round(limits.idle_seconds)),
                          timeout_graceful_shutdown=max(1, round(drain_seconds)), log_level=log_level)


def quiet_repeats() -> OncePerCause:
    """Log repeated server failures once per cause (attached to asyncio's and uvicorn's loggers)."""
    once = OncePerCause()
    for name in ("asyncio", "uvicorn.error", "markov_rsa.server.connections"):
        logging.getLogger(name).addFilter(once)
    return once


def listen(host: str, port: int) -> socket.socket:
    """The listening socket, bound before anything says the server is up, so that a port in use, a port
    out of range or a host that does not resolve is one error line rather than a banner and a log line."""
    if not 0 <= port <= 65535:
        raise ConfigError("port", f"must be 0-65535, got {port}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        raise ConfigError("host", f"cannot resolve {host!r} ({exc}); use an address such as 127.0.0.1") from None
    family = infos[0][0]
    try:
        return socket.create_server((host, port), family=family)
    except OSError as exc:
        raise ConfigError("port", f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def serve(app: Any, limits: ServerLimits, *, sock: socket.socket, drain_seconds: float) -> None:
    """Serve on ``sock`` until SIGTERM or Ctrl-C, then drain (see the module's docstring)."""
    quiet_repeats()
    host, port = sock.getsockname()[:2]
    uvicorn.Server(uvicorn_config(app, limits, host=host, port=port, drain_seconds=drain_seconds)).run(
        sockets=[sock])
