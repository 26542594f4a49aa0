"""The local backend's own rules on tiny models: the cache reaches the model under the keyword its
forward takes, one bad request fails only itself, closing never blocks the event loop, and the
held cache's padding stays bounded."""

from __future__ import annotations

import asyncio
from typing import Any

from markov_rsa import GenerationRequest, SamplingParams
from markov_rsa.backends.transformers import TransformersBackend

GREEDY = SamplingParams(temperature=0)
HELLO = ({"role": "user", "content": "Hello there, how are you today?"},)
OTHER = ({"role": "user", "content": "Name three colours of the rainbow, briefly."},)


def req(messages=HELLO, max_tokens=8, sampling=GREEDY, **kw) -> GenerationRequest:
    return GenerationRequest(messages, max_tokens, sampling, **kw)


class PastKeyValuesModel:
    """A model whose forward takes its cache as ``past_key_values`` (transformers before 5.24, and
    remote-code models): a ``cache=`` keyword lands in its ``**kwargs`` and is dropped, as there."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.config, self.generation_config, self.dtype = inner.config, inner.generation_config, inner.dtype

    def forward(self, input_ids: Any = None, attention_mask: Any = None, position_ids: Any = None,
                past_key_values: Any = None, use_cache: bool | None = None, logits_to_keep: int = 0,
                **kwargs: Any) -> Any:
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          cache=past_key_values, use_cache=use_cache, logits_to_keep=logits_to_keep)

    __call__ = forward

    def to(self, device: Any) -> PastKeyValuesModel:
        return self

    def eval(self) -> PastKeyValuesModel:
        return self

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


async def test_the_cache_goes_under_the_keyword_the_forward_takes(tiny_qwen_moe, tokenizer):
    plain = TransformersBackend(model_object=tiny_qwen_moe, tokenizer_object=tokenizer, device="cpu")
    wrapped = TransformersBackend(model_object=PastKeyValuesModel(tiny_qwen_moe), tokenizer_object=tokenizer,
                                  device="cpu")
    try:
        requests = [req(HELLO, 12), req(OTHER, 12)]
        expected = [g.token_ids for g in await asyncio.gather(*(plain.generate(r) for r in requests))]
        got = [g.token_ids for g in await asyncio.gather(*(wrapped.generate(r) for r in requests))]
    finally:
        plain.close()
        wrapped.close()
    assert got == expected
