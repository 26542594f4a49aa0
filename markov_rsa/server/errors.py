"""The one error type of request handling: an invalid request, answered with an OpenAI-style body."""

from __future__ import annotations


class RequestError(Exception):
    """An invalid request: becomes an OpenAI-style error body naming the parameter."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.param, self.status, self.kind = param, status, kind
