"""Which optional extra provides which import, so that a missing package is one line saying what to install.

The core install (``pip install markov-rsa``) runs the engine against a remote endpoint; the local
backend, the server, grading and Hub datasets come with extras. Any front end that meets a
``ModuleNotFoundError`` for one of these packages turns it into a :class:`MissingDependencyError`
naming the extra, instead of a traceback about a module the user never asked for by name.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from markov_rsa.errors import MissingDependencyError

#: Top-level import name -> the extra that installs it.
EXTRA_OF: Mapping[str, str] = MappingProxyType({
    "torch": "local", "transformers": "local", "accelerate": "local", "gguf": "local", "safetensors": "local",
    "tokenizers": "local", "uvicorn": "serve", "starlette": "serve", "math_verify": "evals",
    "matplotlib": "evals", "huggingface_hub": "hub", "pyarrow": "hub",
})

#: What each extra is for, for the message.
PURPOSE: Mapping[str, str] = MappingProxyType({
    "local": "local models (--model, the embedded demo model)", "serve": "rsa serve",
    "evals": "grading and reports", "hub": "benchmark sets from the Hugging Face Hub",
})


def missing_extra(exc: ModuleNotFoundError) -> MissingDependencyError | None:
    """The one-line error for a missing optional package, or None when the module is not an extra's."""
    top = (exc.name or "").split(".")[0]
    extra = EXTRA_OF.get(top)
    if extra is None:
        return None
    return MissingDependencyError(
        f"{PURPOSE[extra]} need the '{extra}' extra ({top} is not installed): pip install 'markov-rsa[{extra}]'")
