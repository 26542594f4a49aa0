"""What of the upstream a client may learn: nothing but a generic reason.

Upstream error text can hold the upstream's address (a URL, a host name, an IPv4 or IPv6 literal),
file paths and raw bodies. Clients get :func:`public_reason` (the kind of failure and the HTTP
status, no text of the upstream's); messages about their own mistakes pass through :func:`scrub`,
which removes addresses and paths. The full detail goes to the server log.
"""

from __future__ import annotations

import re

_STATUS = re.compile(r"\bHTTP (\d{3})\b")
_PATTERNS = (
    re.compile(r"\b[a-z][a-z0-9+.-]*://\S+", re.IGNORECASE),  # URLs of any scheme
    re.compile(r"\[[0-9a-f:.%a-z]*:[0-9a-f:.%a-z]*\](:\d+)?", re.IGNORECASE),  # bracketed IPv6, with port
    re.compile(r"(?<![\w:])(?:[0-9a-f]{0,4}:){2,7}[0-9a-f]{0,4}(?![\w:])", re.IGNORECASE),  # bare IPv6
    re.compile(r"(?<![\w.])(?:/[\w.@~+-]+){2,}/?"),  # file and URL paths
    re.compile(r"\b\d{1,3}(?:\.\d{1,3}){3}(?::\d+)?\b"),  # IPv4, with port
    re.compile(r"\b(?:[a-z0-9](?:[a-z0-9-]*[a-z0-9])?\.)+[a-z]{2,}(?::\d+)?\b", re.IGNORECASE),  # host names
    re.compile(r"\blocalhost(?::\d+)?\b", re.IGNORECASE),
)


def scrub(message: str, limit: int = 300) -> str:
    """``message`` without addresses, host names or paths."""
    for pattern in (*_PATTERNS, _PATTERNS[3]):  # paths again: an address may have led one
        message = pattern.sub("[upstream]", message)
    return message[:limit]


def public_reason(error: str | None) -> str | None:
    """A failure as a client may see it: its kind and HTTP status, none of the upstream's text."""
    if error is None:
        return None
    status = _STATUS.search(error)
    lowered = error.lower()
    if status:
        return f"the upstream request failed (HTTP {status.group(1)})"
    if "timed out" in lowered or "timeout" in lowered:
        return "the upstream request timed out"
    if "connection" in lowered or "cannot reach" in lowered:
        return "the upstream could not be reached"
    if "finish_reason" in lowered:
        return "the upstream ended the generation early"
    return "the upstream request failed"


def upstream_status(error: str) -> int | None:
    """The last HTTP status an upstream error names, if any."""
    found = _STATUS.findall(error)
    return int(found[-1]) if found else None
