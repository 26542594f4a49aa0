"""TransformersBackend on real models: SmolLM2-135M and tiny random ZAYA / Qwen3-MoE."""

from __future__ import annotations

import asyncio
import time

import pytest

from markov_rsa import GenerationRequest, MarkovianRSA, RSAConfig, SamplingParams
from markov_rsa.backends.transformers import TransformersBackend

GREEDY = SamplingParams(temperature=0)
HELLO = ({"role": "user", "content": "Hello there, how are you today?"},)
OTHER = ({"role": "user", "content": "Name three colours of the rainbow, briefly."},)


def req(messages=HELLO, max_tokens=16, sampling=GREEDY, **kw) -> GenerationRequest:
    return GenerationRequest(messages, max_tokens, sampling, **kw)


LONG = ({"role": "user", "content": "Summarise this. " + "The tide came in over the flats. " * 40},)


async def test_batched_equals_one_at_a_time_under_greedy(smol):
    """Prompts of very different lengths arrive together: prefilled in length groups, then merged."""
    alone = [await smol.generate(req(m, 12)) for m in (HELLO, OTHER, LONG)]
    before = smol.stats
    together = await asyncio.gather(*(smol.generate(req(m, 12)) for m in (HELLO, LONG, OTHER, HELLO, OTHER)))
    assert [g.token_ids for g in together] == [alone[i].token_ids for i in (0, 2, 1, 0, 1)]
    assert all(g.completion_tokens == len(g.token_ids) for g in together)
    assert smol.stats.batches - before.batches == 1 and smol.stats.prefill_tokens_saved > before.prefill_tokens_saved


async def test_token_counts_are_exact_and_max_tokens_is_respected(smol):
    gen = await smol.generate(req(OTHER, 5))
    assert gen.finish_reason == "length" and gen.completion_tokens == 5
    assert await smol.detokenize(gen.token_ids) == gen.text
    template = smol.tokenizer.apply_chat_template(list(OTHER), add_generation_prompt=True, tokenize=True)
    ids = template["input_ids"] if hasattr(template, "keys") else template
    assert gen.prompt_tokens == len(ids)


async def test_eos_and_stop_strings_end_a_row(smol):
    gen = await smol.generate(req(({"role": "user", "content": "What is 2+3? Answer with one number."},), 40))
    assert gen.finish_reason == "stop" and gen.completion_tokens < 40 and "<|im_end|>" not in gen.text
    full = await smol.generate(req(OTHER, 30))
    word = full.text.split()[2]
    stopped = await smol.generate(req(OTHER, 30, SamplingParams(temperature=0, stop=(word,))))
    assert stopped.finish_reason == "stop" and word not in stopped.text
    assert full.text.startswith(stopped.text)


async def test_seeded_sampling_is_reproducible_and_independent_of_batching(smol):
    sampling = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=1234)
    alone = await smol.generate(req(OTHER, 12, sampling))
    mixed = await asyncio.gather(
        smol.generate(req(HELLO, 12, SamplingParams(temperature=0.9, seed=1))),
        smol.generate(req(OTHER, 12, sampling)),
    )
    assert mixed[1].token_ids == alone.token_ids
    other_seed = await smol.generate(req(OTHER, 12, SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=99)))
    assert other_seed.token_ids != alone.token_ids


async def test_requests_arriving_during_a_batch_join_it(smol):
    before = smol.stats
    first = asyncio.create_task(smol.generate(req(HELLO, 40)))
    await asyncio.sleep(0.3)  # the first row is decoding now
    late = await asyncio.gather(*(smol.generate(req(OTHER, 4)) for _ in range(3)))
    assert not first.done(), "the late requests did not wait for the running row to finish"
    assert all(g.completion_tokens == 4 for g in late)
    await first
    stats = smol.stats
    assert stats.batches - before.batches == 2 and stats.joins - before.joins == 1
    assert stats.prefill_tokens_saved - before.prefill_tokens_saved == 2 * (late[0].prompt_tokens - 1), \
        "the three identical late prompts were prefilled once"


async def test_cancelled_request_is_dropped(smol):
    blocker = asyncio.create_task(smol.generate(req(HELLO, 24)))
    await asyncio.sleep(0.1)
    queued = asyncio.create_task(smol.generate(req(OTHER, 24)))
    await asyncio.sleep(0)
    queued.cancel()
    await blocker
    rows_before = smol.stats.rows
    with pytest.raises(asyncio.CancelledError):
        await queued
    await smol.generate(req(OTHER, 1))
    assert smol.stats.rows - rows_before == 1, "the cancelled request never ran"


async def test_cancelling_a_running_request_frees_the_backend(smol):
    running = asyncio.create_task(smol.generate(req(OTHER, 400)))
    await asyncio.sleep(0.5)  # it is generating now: 400 tokens would take about half a minute
    running.cancel()
    started = time.perf_counter()
    await smol.generate(req(HELLO, 2))
    assert time.perf_counter() - started < 5, "the cancelled row stopped at its next step"


async def test_close_fails_running_and_queued_requests_and_stops_the_worker(tiny_zaya, tokenizer):
    from markov_rsa import BackendUnavailableError

    backend = TransformersBackend(model_object=tiny_zaya, tokenizer_object=tokenizer, device="cpu",
                                  max_batch_size=1)
    running = asyncio.create_task(backend.generate(req(HELLO, 3000)))
    queued = asyncio.create_task(backend.generate(req(OTHER, 5)))
    await asyncio.sleep(0.3)
    await asyncio.to_thread(backend.close)
    for task in (running, queued):
        with pytest.raises(BackendUnavailableError, match="closed"):
            await task
    assert not backend._worker.is_alive()
    with pytest.raises(BackendUnavailableError, match="closed"):
        await backend.generate(req(HELLO, 1))


def test_device_and_model_are_reported_honestly(smol):
    assert smol.info.device == "cpu" and smol.info.tokenizer == "exact"
    assert smol.info.extra["dtype"] == "float32" and smol.info.extra["model_type"] == "llama"


@pytest.fixture(params=["tiny_zaya", "tiny_qwen_moe"])
def tiny(request, tokenizer):
    model = request.getfixturevalue(request.param)
    backends = {
        share: TransformersBackend(model_object=model, tokenizer_object=tokenizer, device="cpu", prefix_sharing=share)
        for share in (True, False)
    }
    yield model, backends
    for backend in backends.values():
        backend.close()


async def test_tiny_moe_prefix_sharing_and_batching_match_plain_generate(tiny, tokenizer):
    import torch

    model, backends = tiny
    ids = backends[True]._prompt_ids(req())
    reference = model.generate(
        torch.tensor([ids]), max_new_tokens=20, do_sample=False, min_new_tokens=20,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    )[0, len(ids):].tolist()
    for share, backend in backends.items():
        before = backend.stats.prefill_tokens_saved
        same = await asyncio.gather(*(backend.generate(req(HELLO, 20)) for _ in range(4)))
        saved = backend.stats.prefill_tokens_saved - before
        assert all(list(g.token_ids) == reference[: len(g.token_ids)] for g in same)
        assert (saved == 3 * (len(ids) - 1)) if share else saved == 0
        mixed = await asyncio.gather(backend.generate(req(OTHER, 20)), backend.generate(req(HELLO, 20)))
        assert mixed[1].token_ids == same[0].token_ids, "left padding does not change a row"


async def test_chunked_rollouts_run_on_the_real_zaya_code_path(tiny_zaya, tokenizer):
    backend = TransformersBackend(model_object=tiny_zaya, tokenizer_object=tokenizer, device="cpu")
    seen: list[GenerationRequest] = []
    original = backend.generate

    async def spy(request):
        seen.append(request)
        return await original(request)

    backend.generate = spy  # type: ignore[method-assign]
    cfg = RSAConfig(population=2, k=1, rounds=1, budget=48, tail=8, chunk_size=16, carryover=6, keep_head=2,
                    temperature=0, seed=0, task="generic")
    result = await MarkovianRSA(backend, cfg).solve("Count upwards from one.")
    backend.close()
    chunked = [r for r in seen if r.assistant_prefix_ids]
    assert chunked, "later chunks carry a prefix"
    assert all(len(r.assistant_prefix_ids) == 8 for r in chunked), "keep_head + carryover tokens, exactly"
    assert all(r.max_tokens <= 16 for r in seen)
    assert all(c.chunks >= 1 and c.usage.completion_tokens <= 48 for r in result.rounds for c in r.candidates)


async def test_loads_a_gguf_file_directly():
    from markov_rsa.backends.demo import demo_gguf

    backend = TransformersBackend(str(demo_gguf()), device="cpu")
    try:
        gen = await backend.generate(req(HELLO, 6))
        assert gen.completion_tokens == len(gen.token_ids) <= 6 and gen.text
        assert backend.info.extra["model_type"] == "llama"
    finally:
        backend.close()


PROMPTS = [
    ({"role": "user", "content": "Count from one to twenty."},),
    HELLO,
    ({"role": "user", "content": "Hi"},),
    OTHER,
    ({"role": "user", "content": "Describe a long, winding river that flows through three countries."},),
    HELLO,
]
LENGTHS = [48, 9, 30, 5, 22, 40]


ROWS = [req(p, n) for p, n in zip(PROMPTS, LENGTHS, strict=True)]


def ids(generations) -> list[tuple[int, ...]]:
    return [g.token_ids for g in generations]


async def one_at_a_time(backend, requests=ROWS) -> list:
    return [await backend.generate(r) for r in requests]


async def staggered(backend, gap: float, requests=ROWS) -> list:
    """``requests``, each sent ``gap`` seconds after the previous one, all in flight together."""

    async def later(i: int):
        await asyncio.sleep(gap * i)
        return await backend.generate(requests[i])

    return await asyncio.gather(*(later(i) for i in range(len(requests))))


@pytest.mark.parametrize("name", ["smol_model", "tiny_zaya", "tiny_qwen_moe"])
async def test_staggered_arrivals_and_departures_equal_one_at_a_time(name, request, tokenizer):
    """Rows join a running batch (prompts longer and shorter than it) and leave it as they end.

    On ZAYA this carries CCA's convolution and recurrent value state through every merge and drop;
    a row whose state were mixed up with another's, or shifted by padding, would change tokens.
    """
    model = request.getfixturevalue(name)
    backend = TransformersBackend(model_object=model, tokenizer_object=tokenizer, device="cpu", max_batch_size=3)
    try:
        alone = ids(await one_at_a_time(backend))
        before = backend.stats
        gap = 0.15 if name == "smol_model" else 0.01
        together = ids(await staggered(backend, gap))
        stats = backend.stats
    finally:
        backend.close()
    assert together == alone
    assert stats.joins - before.joins >= 2, "rows joined a running batch"
    assert stats.peak_rows == 3, "the cache held up to max_batch_size rows, never more"
    assert stats.steps - before.steps < sum(len(t) for t in alone), "rows shared decode steps"
    wasted = (stats.row_steps - before.row_steps) - (stats.kept_tokens - before.kept_tokens)
    assert wasted == sum(len(t) < n for t, n in zip(alone, LENGTHS, strict=True)), \
        "the only row-steps not kept are end-of-text tokens: no step computed a finished row"


@pytest.fixture(scope="module")
def smol_model(demo_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(demo_dir).eval()


async def until(backend, rows: int, task) -> None:
    while backend.stats.cache_rows != rows and not task.done():
        await asyncio.sleep(0.001)


async def test_finished_rows_leave_the_cache_and_free_it(tiny_zaya, tokenizer):
    backend = TransformersBackend(model_object=tiny_zaya, tokenizer_object=tokenizer, device="cpu")
    try:
        alone = await backend.generate(req(HELLO, 600))
        long = asyncio.create_task(backend.generate(req(HELLO, 600)))
        short = await asyncio.gather(*(backend.generate(req(OTHER, 12)) for _ in range(3)))
        while backend.stats.cache_rows != 1 and not long.done():
            await asyncio.sleep(0.001)
        one_row = backend.stats
        assert not long.done(), "the long row was still running"
        assert (await long).token_ids == alone.token_ids
    finally:
        backend.close()
    assert all(g.completion_tokens == 12 for g in short)
    assert one_row.cache_rows == 1 and one_row.peak_rows == 4
    # four rows about as wide as the one left: the departed rows' share of the cache was freed
    assert one_row.cache_bytes < one_row.peak_cache_bytes / 2
    assert backend.stats.cache_rows == 0 and backend.stats.cache_bytes == 0


async def test_sliding_window_models_drop_rows_but_join_only_an_empty_batch(tokenizer):
    """A cache layout the merge does not know still runs correctly: rows wait for an empty batch."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, use_sliding_window=True, sliding_window=16,
        layer_types=["sliding_attention", "full_attention"],
    )
    model = Qwen3ForCausalLM(config).eval()
    backend = TransformersBackend(model_object=model, tokenizer_object=tokenizer, device="cpu", max_batch_size=3)
    try:
        alone = ids(await one_at_a_time(backend))
        together = ids(await staggered(backend, 0.01))
    finally:
        backend.close()
    assert together == alone
    assert backend.stats.joins == 0


async def test_requests_beyond_the_batch_wait_prefilled_and_keep_their_tokens(tiny_zaya, tokenizer):
    """Five requests for two slots: some are prefilled ahead and join as slots free, one is
    cancelled while it waits; every other one gets the tokens it gets alone (CCA state included)."""
    backend = TransformersBackend(model_object=tiny_zaya, tokenizer_object=tokenizer, device="cpu", max_batch_size=2)
    try:
        alone = ids(await one_at_a_time(backend))
        before = backend.stats
        tasks = [asyncio.create_task(backend.generate(r)) for r in ROWS]
        await asyncio.sleep(0.005)
        tasks[4].cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        stats = backend.stats
    finally:
        backend.close()
    assert isinstance(results[4], asyncio.CancelledError)
    assert [r.token_ids for n, r in enumerate(results) if n != 4] == [t for n, t in enumerate(alone) if n != 4]
    assert stats.peak_rows == 2 and stats.batches - before.batches < len(PROMPTS), "prefilled several at once"
    assert stats.joins - before.joins >= 2


async def test_staggered_sampled_rows_with_stops_keep_their_tokens(tiny_zaya, tokenizer):
    """Seeded sampling and stop strings are per row: joining a busy batch changes neither."""
    backend = TransformersBackend(model_object=tiny_zaya, tokenizer_object=tokenizer, device="cpu", max_batch_size=3)

    def sampled(i: int, stop: tuple[str, ...] = ()) -> GenerationRequest:
        return req(PROMPTS[i], LENGTHS[i], SamplingParams(temperature=0.9, top_p=0.9, top_k=40, seed=7 + i, stop=stop))

    try:
        free = (await backend.generate(sampled(0))).text
        stop = (free[len(free) // 2: len(free) // 2 + 3],)
        requests = [sampled(0, stop), *(sampled(i) for i in range(1, len(PROMPTS)))]
        alone = await one_at_a_time(backend, requests)
        together = await staggered(backend, 0.01, requests)
    finally:
        backend.close()
    assert alone[0].finish_reason == "stop" and stop[0] not in alone[0].text
    assert [(g.token_ids, g.text, g.finish_reason) for g in together] == \
        [(g.token_ids, g.text, g.finish_reason) for g in alone]
