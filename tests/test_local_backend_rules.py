"""The local backend's own rules on tiny models: the cache reaches the model under the keyword its
forward takes, one bad request fails only itself, closing never blocks the event loop, and the
held cache's padding stays bounded."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from markov_rsa import BackendRequestError, BackendUnavailableError, GenerationRequest, SamplingParams
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


@pytest.fixture
def zaya(tiny_zaya, tokenizer):
    backend = TransformersBackend(model_object=tiny_zaya, tokenizer_object=tokenizer, device="cpu")
    yield backend
    backend.close()


def sampled(**kw: Any) -> SamplingParams:
    return SamplingParams(**{"temperature": 0.0, **kw})


BAD = [
    (req(max_tokens=-1), "max_tokens"),
    (req(sampling=sampled(temperature=None)), "temperature"),
    (req(sampling=sampled(temperature=float("nan"))), "temperature"),
    (req(sampling=sampled(top_p=0.0)), "top_p"),
    (req(sampling=sampled(top_k=-3)), "top_k"),
    (req(sampling=sampled(stop=(5,))), "stop"),
    (req(sampling=sampled(stop=None)), "stop"),
    (req(assistant_prefix_ids=(10**9,)), "assistant_prefix_ids"),
    (req(max_tokens=5000), "max_tokens"),  # the tiny model has 4,096 positions
]


@pytest.mark.parametrize(("bad", "field"), BAD, ids=[f for _, f in BAD])
async def test_a_bad_request_fails_alone_with_its_field_named(zaya, bad, field):
    good = [req(HELLO, 8), req(OTHER, 8), req(HELLO, 6)]
    alone = [(await zaya.generate(r)).token_ids for r in good]
    results = await asyncio.wait_for(
        asyncio.gather(*(zaya.generate(r) for r in (good[0], bad, *good[1:])), return_exceptions=True), 60)
    error = results[1]
    assert isinstance(error, BackendRequestError) and str(error).startswith(f"{field}:"), error
    assert [g.token_ids for g in (results[0], *results[2:])] == alone


async def test_max_tokens_zero_computes_no_step(zaya):
    before = zaya.stats
    gen = await zaya.generate(req(max_tokens=0))
    assert gen.completion_tokens == 0 and gen.text == "" and gen.prompt_tokens > 0
    assert zaya.stats.steps == before.steps and zaya.stats.batches == before.batches


async def test_a_prompt_over_the_context_fails_alone_and_its_batch_mates_finish(zaya):
    long = ({"role": "user", "content": "word " * 4200},)
    results = await asyncio.wait_for(asyncio.gather(zaya.generate(req(HELLO, 6)), zaya.generate(req(long, 4)),
                                                    return_exceptions=True), 120)
    assert results[0].completion_tokens == 6
    assert isinstance(results[1], BackendRequestError) and "positions" in str(results[1])


async def test_an_error_building_one_result_fails_that_request_only(zaya, monkeypatch):
    original = zaya._generation

    def flaky(row, latency, think):
        if row.owner.request.max_tokens == 5:
            raise ValueError("cannot decode")
        return original(row, latency, think)

    monkeypatch.setattr(zaya, "_generation", flaky)
    results = await asyncio.wait_for(asyncio.gather(*(zaya.generate(req(HELLO, n)) for n in (5, 5, 7)),
                                                    return_exceptions=True), 60)
    assert all(isinstance(r, BackendUnavailableError) and "cannot decode" in str(r) for r in results[:2])
    assert results[2].completion_tokens == 7


async def test_a_prefill_failure_fails_only_the_row_that_caused_it(tiny_zaya, tokenizer, monkeypatch):
    backend = TransformersBackend(model_object=tiny_zaya, tokenizer_object=tokenizer, device="cpu")
    poison = (await backend.tokenize("zebra"))[0]
    forward = tiny_zaya.forward

    def failing(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("input_ids") is not None and bool((kwargs["input_ids"] == poison).any()):
            raise RuntimeError("bad row")
        return forward(*args, **kwargs)

    try:
        alone = (await backend.generate(req(OTHER, 6))).token_ids
        monkeypatch.setattr(tiny_zaya, "forward", failing)
        results = await asyncio.wait_for(asyncio.gather(
            backend.generate(req(OTHER, 6)), backend.generate(req(({"role": "user", "content": "zebra zebra"},), 6)),
            return_exceptions=True), 60)
    finally:
        backend.close()
    assert results[0].token_ids == alone
    assert isinstance(results[1], BackendUnavailableError) and "bad row" in str(results[1])


async def test_unseeded_requests_leave_the_global_rng_alone_and_aclose_does_not_block(tiny_zaya, tokenizer):
    import torch

    backend = TransformersBackend(model_object=tiny_zaya, tokenizer_object=tokenizer, device="cpu",
                                  max_batch_size=1)
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    await backend.generate(req(HELLO, 4, SamplingParams(temperature=1.0)))
    assert torch.equal(torch.get_rng_state(), state), "the worker did not reseed torch's global RNG"
    running = asyncio.create_task(backend.generate(req(HELLO, 3000)))
    await asyncio.sleep(0.3)
    closed_on: list[threading.Thread] = []
    close = backend.close

    def recording_close() -> None:
        closed_on.append(threading.current_thread())
        close()

    backend.close = recording_close  # type: ignore[method-assign]
    await backend.aclose()
    with pytest.raises(BackendUnavailableError):
        await running
    assert closed_on and closed_on[0] is not threading.main_thread(), "close() waited off the event loop's thread"
    assert not backend._worker.is_alive()


async def test_a_long_row_does_not_pad_every_short_one_to_its_width(tiny_zaya, tokenizer):
    """One 600-token prompt among short joiners: with the padding cap, short rows wait for room
    rather than each being padded to the long row's width; tokens are the same either way."""
    long = req(({"role": "user", "content": "Summarise. " + "The tide came in over the flats. " * 75},), 30)
    short = [req(({"role": "user", "content": f"Count to {n}."},), 10) for n in range(6)]
    runs = {}
    for cap in (0.5, 1.0):
        backend = TransformersBackend(model_object=tiny_zaya, tokenizer_object=tokenizer, device="cpu",
                                      max_padding=cap)
        try:
            first = asyncio.create_task(backend.generate(long))
            while backend.stats.steps == 0:
                await asyncio.sleep(0.001)
            rest = await asyncio.gather(*(backend.generate(r) for r in short))
            runs[cap] = ([g.token_ids for g in (await first, *rest)], backend.stats)
        finally:
            backend.close()
    (capped, capped_stats), (free, free_stats) = runs[0.5], runs[1.0]
    assert capped == free
    assert free_stats.peak_rows == 7 and capped_stats.peak_rows < 7
    assert capped_stats.peak_cache_bytes < free_stats.peak_cache_bytes / 2
    assert capped_stats.cache_bytes == 0 and capped_stats.peak_cache_bytes > 0


async def test_a_decode_step_failure_fails_only_the_row_that_caused_it(tiny_zaya, tokenizer, monkeypatch):
    """A row whose pending token breaks the decode step fails alone; the rows that shared the
    step are re-prefilled from what they had and finish with the tokens they get alone."""
    backend = TransformersBackend(model_object=tiny_zaya, tokenizer_object=tokenizer, device="cpu")
    poison = (await backend.tokenize(" zebra"))[0]
    forward = tiny_zaya.forward

    def failing(*args: Any, **kwargs: Any) -> Any:
        ids = kwargs.get("input_ids")
        if ids is not None and ids.shape[1] == 1 and bool((ids == poison).any()):
            raise RuntimeError("bad step")
        return forward(*args, **kwargs)

    good = [req(HELLO, 12), req(OTHER, 10), req(HELLO, 7)]
    try:
        alone = [(await backend.generate(r)).token_ids for r in good]
        assert all(poison not in ids for ids in alone)
        monkeypatch.setattr(tiny_zaya, "forward", failing)
        results = await asyncio.wait_for(asyncio.gather(
            *(backend.generate(r) for r in good[:2]), backend.generate(req(OTHER, 8, assistant_prefix_ids=(poison,))),
            backend.generate(good[2]), return_exceptions=True), 120)
    finally:
        backend.close()
    assert isinstance(results[2], BackendUnavailableError) and "bad step" in str(results[2])
    assert [g.token_ids for g in (*results[:2], results[3])] == alone
