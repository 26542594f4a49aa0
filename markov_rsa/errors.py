"""Exception types shared by the engine, the backends and the front ends.

Every error carries a message that tells the user what to change. ``exit_code`` lets the CLI map
an error to a status without a traceback: 2 for input the user can fix, 1 for a run that failed.
"""

from __future__ import annotations


class MarkovRSAError(Exception):
    """Base class of every error this package raises on purpose."""

    exit_code: int = 1


class ConfigError(MarkovRSAError, ValueError):
    """An invalid setting; the message names the field and the allowed values."""

    exit_code = 2

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(f"{field}: {message}")


class MissingDependencyError(MarkovRSAError, ImportError):
    """An optional package is needed for what was asked; the message says how to install it."""

    exit_code = 2


class DatasetUnavailableError(MarkovRSAError):
    """A benchmark set could not be fetched (offline, no cached copy); the message says how to use a local copy."""

    exit_code = 2


class BackendError(MarkovRSAError):
    """A backend could not produce a generation."""

    #: Whether retrying the same request may succeed (timeouts, overload, dropped connections).
    retryable: bool = False
    #: Requests the failed generation cost (its retries included), and the tokens its failed attempts had
    #: streamed (paid for, thrown away), where the backend counts them.
    attempts: int = 0
    discarded_tokens: int = 0


class BackendUnavailableError(BackendError):
    """The backend could not be reached or kept failing after its retries."""

    retryable = True


class BackendRequestError(BackendError):
    """The backend refused the request for a reason a retry cannot fix (bad URL, key or model)."""

    exit_code = 2

    def __init__(self, message: str, status_code: int | None = None) -> None:
        self.status_code = status_code
        super().__init__(message)


class AuthenticationError(BackendRequestError):
    """The endpoint rejected the API key (HTTP 401/403)."""


class ModelNotFoundError(BackendRequestError):
    """The endpoint does not serve the requested model or path (HTTP 404)."""


class RunCancelledError(MarkovRSAError):
    """A run was cancelled before it produced an answer."""
