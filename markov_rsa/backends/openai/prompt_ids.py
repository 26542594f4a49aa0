"""Chat prompts as exact token ids, so a chunked rollout continues from the model's own tokens.

A chunk continues over ``/v1/completions`` from the chat template's ids followed by the carried ids,
rather than from re-tokenized text. The template is applied by a Hugging Face tokenizer where one is
named, by the server's tokenize endpoint where it takes messages (vLLM, SGLang), or by llama.cpp's
``/apply-template`` then ``/tokenize``. Renders are cached: every chunk of a rollout, and every
rollout of a stage, shares its messages.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from markov_rsa.backends.base import Message
from markov_rsa.backends.openai.dialect import Dialect, token_list

#: Renders kept (oldest dropped first).
CACHE_SIZE = 256


@dataclass
class ChatPromptIds:
    dialect: Dialect
    _cache: dict[str, list[int]] = field(default_factory=dict, repr=False)

    async def render(self, messages: tuple[Message, ...]) -> list[int]:
        """The chat template applied to ``messages`` with the assistant turn opened, as token ids."""
        key = json.dumps(messages, sort_keys=True)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        dialect = self.dialect
        if dialect.hf_tokenizer is not None:
            rendered = dialect.hf_tokenizer.apply_chat_template(list(messages), add_generation_prompt=True,
                                                                tokenize=True)
            ids = [int(t) for t in (rendered["input_ids"] if isinstance(rendered, Mapping) else rendered)]
        elif dialect.route is not None and dialect.route.style == "llamacpp":
            rendered = await dialect.router.call("/apply-template", {"messages": list(messages)}, root=True,
                                                 attempts=2)
            body: dict[str, Any] = {"content": str(rendered["prompt"]), "add_special": True, "parse_special": True}
            data = await dialect.router.call(dialect.route.tokenize, body, root=True, attempts=2)
            ids = token_list(data, dialect.route.tokenize)
        else:
            body = {"model": dialect.model, "messages": list(messages), "add_generation_prompt": True}
            assert dialect.route is not None
            data = await dialect.router.call(dialect.route.tokenize, body, root=True, attempts=2)
            ids = token_list(data, dialect.route.tokenize)
        if len(self._cache) >= CACHE_SIZE:
            self._cache.pop(next(iter(self._cache)))
        self._cache[key] = ids
        return ids
