"""One way to build a backend from options, for the CLI, the server and library users alike.

``--base-url`` → the remote backend, ``--model`` → the local one, neither → the embedded demo model;
``backend=`` names one explicitly. Conflicting or missing options are a :class:`ConfigError`.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

from markov_rsa.backends.base import Backend
from markov_rsa.errors import ConfigError


@dataclass(frozen=True)
class BackendOptions:
    backend: str = "auto"
    model: str | None = None
    base_url: tuple[str, ...] = ()
    api_key_env: str | None = None
    tokenizer: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    #: Most requests in flight at once: the remote backend's open requests (default 64), or the
    #: local backend's running batch (default 16 rows).
    max_concurrency: int | None = None
    timeout: float = 600.0
    #: How requests are spread over several --base-url replicas: affinity or least-busy.
    routing: str = "affinity"

    @property
    def kind(self) -> str:
        """Which backend the options select; conflicting or missing flags are a ConfigError."""
        if self.backend not in ("auto", "local", "openai", "demo"):
            raise ConfigError("backend", f"must be auto, local, openai or demo, got {self.backend!r}")
        if self.backend == "auto":
            return "openai" if self.base_url else "local" if self.model else "demo"
        if self.backend == "openai" and not self.base_url:
            raise ConfigError("base_url", "--backend openai needs --base-url (and --model)")
        if self.backend == "local" and not self.model:
            raise ConfigError("model", "--backend local needs --model (a Hub id, directory or .gguf file)")
        if self.routing not in ("affinity", "least-busy"):
            raise ConfigError("routing", f"must be affinity or least-busy, got {self.routing!r}")
        if self.backend in ("local", "demo") and self.base_url:
            raise ConfigError("base_url", f"--base-url does not apply to --backend {self.backend}")
        if self.backend == "demo" and self.model:
            raise ConfigError("model", "--model does not apply to --backend demo")
        return self.backend

    @property
    def embedded(self) -> bool:
        return self.kind == "demo"


def _quiet_transformers() -> None:
    """Keep the terminal for our own output: no weight-loading bars or info logs from transformers."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def build_backend(opts: BackendOptions, *, announce: bool = True) -> Backend:
    """The backend the options describe; announces the embedded model on stderr."""
    kind = opts.kind
    if kind == "openai":
        from markov_rsa.backends.openai import OpenAIBackend

        api_key = None
        if opts.api_key_env:
            api_key = os.environ.get(opts.api_key_env)
            if not api_key:
                raise ConfigError("api_key_env", f"environment variable {opts.api_key_env} is not set or empty")
        return OpenAIBackend(
            list(opts.base_url),
            model=opts.model or "",
            api_key=api_key,
            tokenizer=opts.tokenizer,
            max_concurrency=opts.max_concurrency or 64,
            timeout=opts.timeout,
            routing="least-busy" if opts.routing == "least-busy" else "affinity",
        )
    if opts.routing != "affinity":
        raise ConfigError("routing", "--routing applies to the remote backend only (give --base-url)")
    if kind == "local":
        from markov_rsa.backends.transformers import TransformersBackend

        _quiet_transformers()
        return TransformersBackend(opts.model, device=opts.device, dtype=opts.dtype,
                                   max_batch_size=opts.max_concurrency or 16)
    from markov_rsa.backends.demo import DEMO_NOTICE, cache_root, demo_backend, demo_model_cached

    _quiet_transformers()
    if announce:
        print(DEMO_NOTICE, file=sys.stderr)
        if not demo_model_cached():
            print(f"first run: converting the embedded GGUF once to a cached copy in {cache_root()} "
                  "(about 20 s)", file=sys.stderr)
    return demo_backend(device="cpu" if opts.device == "auto" else opts.device,
                        max_batch_size=opts.max_concurrency or 16)


