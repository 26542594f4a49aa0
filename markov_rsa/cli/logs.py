"""``--log-level`` and ``--log-file`` for every command: stdlib logging under the ``markov_rsa`` logger.

Retries, replica ejections, approximate tails and silent streams are logged by the library; this
only decides where the lines go. No secret is ever passed to a logger, so none can reach a log.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from markov_rsa.errors import ConfigError

LEVELS = ("debug", "info", "warning", "error")

LogLevel = Annotated[
    str, typer.Option(help=f"Log level of the markov_rsa logger: {', '.join(LEVELS)}.", case_sensitive=False)
]
LogFile = Annotated[Path | None, typer.Option(help="Write log lines to this file instead of stderr.")]


def setup_logging(level: str, file: Path | None) -> None:
    """Send the ``markov_rsa`` logger's lines at ``level`` and above to ``file`` (else stderr)."""
    if level.lower() not in LEVELS:
        raise ConfigError("log_level", f"must be one of {', '.join(LEVELS)}, got {level!r}")
    logger = logging.getLogger("markov_rsa")
    for old in list(logger.handlers):
        logger.removeHandler(old)
        old.close()
    try:
        handler: logging.Handler = logging.FileHandler(file, encoding="utf-8") if file else logging.StreamHandler()
    except OSError as exc:
        raise ConfigError("log_file", f"cannot write {file}: {exc.strerror}") from None
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(level.upper())
    logger.propagate = False
