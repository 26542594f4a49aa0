"""The remote backend: any OpenAI-compatible endpoint (vLLM, SGLang, llama.cpp, Zyphra Cloud).

See :mod:`markov_rsa.backends.openai.backend`; the package's modules each do one job of it.
"""

from markov_rsa.backends.openai.backend import OpenAIBackend
from markov_rsa.backends.retry import RetryPolicy, Timeouts

__all__ = ["OpenAIBackend", "RetryPolicy", "Timeouts"]
