"""The remote backend runs what the paper ran: stated sampling, exact token-id chunk continuation.

``VLLMLike`` stands in for vLLM in the ways these tests are about (generation-config defaults for
missing sampling fields, a reasoning parser, a chat template that opens the think block, token-id
prompts on /v1/completions); llama.cpp's real server checks token-id continuation end to end.
"""

from __future__ import annotations

import pytest

from markov_rsa import BackendRequestError, GenerationRequest, MarkovianRSA, RSAConfig, SamplingParams
from markov_rsa.backends.openai import OpenAIBackend, RetryPolicy
from tests.servers import VLLMLike, encode, llama_server, serve_app
from tests.test_openai_backend import gguf_path

FAST = RetryPolicy(max_attempts=3, initial_backoff=0.01, max_backoff=0.05)


FULL = "".join(f"s{i};" for i in range(40)) + "</think>The answer is \\boxed{12}."


def thinker(prompt: str, body: dict) -> str:
    """Writes FULL: from its start after a fresh prompt, else on from the carried text the prompt ends
    with (every 20-character window of FULL is unique), as a model continuing its own trace would."""
    if prompt.endswith("<think>"):
        return FULL
    at = FULL.find(prompt[-20:])
    return FULL[at + 20:] if at >= 0 else FULL


@pytest.fixture
def vllm():
    server = VLLMLike(thinker)
    with serve_app(server.app()) as url:
        server.url = f"{url}/v1"  # type: ignore[attr-defined]
        yield server


async def test_every_request_states_sampling_so_server_defaults_never_apply(vllm):
    backend = OpenAIBackend(vllm.url, model="vllm-like", retry=FAST)
    config = RSAConfig(population=3, k=2, rounds=1, budget=400, tail=30, seed=1, final="aggregate",
                       final_temperature=0.6, final_top_p=0.95, final_top_k=40)
    result = await MarkovianRSA(backend, config).solve("What is 3 * 4?")
    await backend.aclose()
    assert len(vllm.effective) == 7
    rollouts, finals = vllm.effective[:6], vllm.effective[6:]
    assert all(e == {"temperature": 1.0, "top_p": 1.0, "top_k": -1} for e in rollouts), rollouts
    assert finals == [{"temperature": 0.6, "top_p": 0.95, "top_k": 40}]
    assert result.sampling["rollout"] == {"temperature": 1.0, "top_p": 1.0, "top_k": None}
    assert result.answer == "12"
    assert all(c.reasoning.startswith("s0;s1;") for r in result.rounds for c in r.candidates)


async def test_chunks_continue_from_exact_token_ids_over_completions(vllm):
    """With a tokenize endpoint that applies the chat template, chunk j+1's prompt is the template's
    ids followed by exactly the carried ids; no text round trip, no continue_final_message."""
    backend = OpenAIBackend(vllm.url, model="vllm-like", retry=FAST)
    config = RSAConfig(population=1, k=1, rounds=0, budget=200, tail=30, chunk_size=50, carryover=20, seed=0)
    result = await MarkovianRSA(backend, config).solve("Q?")
    await backend.aclose()
    chat = [b for b in vllm.bodies if "messages" in b]
    completions = [b for b in vllm.bodies if "prompt" in b]
    assert len(chat) == 1 and len(completions) == 3 and not any("continue_final_message" in b for b in vllm.bodies)
    template = VLLMLike.render([{"role": "user", "content": chat[0]["messages"][0]["content"]}])
    assert completions[0]["prompt"] == encode(template + FULL[30:50])
    assert completions[2]["prompt"] == encode(template + FULL[130:150])
    candidate = result.rounds[0].candidates[0]
    assert candidate.chunks == 4 and candidate.reasoning == FULL[: FULL.index("</think>")]
    assert result.answer == "12", "the answer written in the last chunk is read from the joined text"


async def test_continue_final_message_is_the_fallback_with_a_clear_error():
    """No way to render the template to ids: chunks continue with continue_final_message, and a
    server that refuses it gets an error that says what to do."""

    class Refusing(VLLMLike):
        async def _chat(self, request):
            from starlette.responses import JSONResponse
            body = await request.json()
            if body.get("continue_final_message"):
                return JSONResponse({"object": "error", "message": "This chat template cannot continue the final "
                                     "message", "code": 400}, status_code=400)
            return await super()._chat(request)

    server = Refusing(thinker)
    app = server.app()
    app.routes[:] = [r for r in app.routes if getattr(r, "path", "") not in ("/tokenize", "/detokenize")]
    with serve_app(app) as url:
        backend = OpenAIBackend(f"{url}/v1", model="vllm-like", retry=FAST)
        request = GenerationRequest(({"role": "user", "content": "Q?"},), 20, SamplingParams(seed=1),
                                    assistant_prefix="hmm hmm", assistant_prefix_ids=None)
        with pytest.raises(BackendRequestError, match="--tokenizer"):
            await backend.generate(request)
        await backend.aclose()


@pytest.fixture(scope="module")
def llama_url():
    with llama_server(gguf_path()) as url:
        yield url


async def test_llama_cpp_continues_a_chunk_from_token_ids(llama_url):
    """Real llama.cpp: the chat template rendered by the server (/apply-template, /tokenize), the carried
    ids appended, sent as a token prompt; greedy continuation matches generating in one go."""
    backend = OpenAIBackend(llama_url, model="smollm2", retry=FAST)
    messages = ({"role": "user", "content": "Count from one to twenty in words."},)
    greedy = SamplingParams(temperature=0.0, seed=0)
    whole = await backend.generate(GenerationRequest(messages, 24, greedy))
    assert backend.info.tokenizer == "exact"
    ids = await backend.tokenize(whole.text)
    head = tuple(ids[:12])
    prefix = await backend.detokenize(head)
    cont = await backend.generate(GenerationRequest(messages, 12, greedy, assistant_prefix=prefix,
                                                    assistant_prefix_ids=head))
    await backend.aclose()
    assert cont.completion_tokens > 0
    assert prefix + cont.text == whole.text


async def test_llama_cpp_with_a_hugging_face_tokenizer_renders_the_template_locally(llama_url, demo_dir):
    backend = OpenAIBackend(llama_url, model="smollm2", tokenizer=str(demo_dir), retry=FAST)
    messages = ({"role": "user", "content": "Count from one to twenty in words."},)
    greedy = SamplingParams(temperature=0.0, seed=0)
    whole = await backend.generate(GenerationRequest(messages, 20, greedy))
    ids = await backend.tokenize(whole.text)
    head = tuple(ids[:10])
    cont = await backend.generate(GenerationRequest(messages, 10, greedy, assistant_prefix_ids=head))
    await backend.aclose()
    assert (await backend.detokenize(head)) + cont.text == whole.text


async def test_delethink_run_over_llama_cpp_uses_token_prompts(llama_url):
    backend = OpenAIBackend(llama_url, model="smollm2", retry=FAST)
    config = RSAConfig(population=2, k=1, rounds=1, budget=60, tail=10, chunk_size=24, carryover=8, keep_head=4,
                       chunk_mode="context", seed=0)
    result = await MarkovianRSA(backend, config).solve("Write a long story about a cat.")
    await backend.aclose()
    assert all(c.ok and c.usage.completion_tokens <= 60 for r in result.rounds for c in r.candidates)
    assert any(c.chunks >= 2 for r in result.rounds for c in r.candidates)
    assert [c.parents for c in result.rounds[1].candidates] == [[0], [1]]


async def test_a_template_that_opens_the_think_block_is_detected_over_the_wire():
    """No reasoning parser, and the chat template opens <think>: a reply cut before </think> is unfinished
    reasoning (no vote), one that closes it answers."""
    server = VLLMLike(thinker, reasoning_parser=False)
    with serve_app(server.app()) as url:
        backend = OpenAIBackend(f"{url}/v1", model="vllm-like", retry=FAST)
        short = await MarkovianRSA(backend, RSAConfig(population=2, k=2, rounds=0, budget=40, tail=10,
                                                      seed=0)).solve("Q?")
        full = await MarkovianRSA(backend, RSAConfig(population=2, k=2, rounds=0, budget=400, tail=10,
                                                     seed=0)).solve("Q?")
        await backend.aclose()
    assert [c.answer for c in short.rounds[0].candidates] == [None, None]
    assert short.rounds[0].candidates[0].reasoning.startswith("s0;s1;")
    assert [c.answer for c in full.rounds[0].candidates] == ["12", "12"]
