"""Backends: the local transformers model and any OpenAI-compatible endpoint.

``TransformersBackend`` is imported lazily so that remote-only users never import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from markov_rsa.backends.base import Backend, BackendInfo, Generation, GenerationRequest, SamplingParams

if TYPE_CHECKING:
    from markov_rsa.backends.openai import OpenAIBackend
    from markov_rsa.backends.transformers import TransformersBackend

__all__ = [
    "Backend", "BackendInfo", "Generation", "GenerationRequest", "OpenAIBackend", "SamplingParams",
    "TransformersBackend",
]


def __getattr__(name: str) -> Any:
    if name == "TransformersBackend":
        from markov_rsa.backends.transformers import TransformersBackend

        return TransformersBackend
    if name == "OpenAIBackend":
        from markov_rsa.backends.openai import OpenAIBackend

        return OpenAIBackend
    raise AttributeError(name)
