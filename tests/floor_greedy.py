"""Run by ``test_transformers_floor`` under the lowest transformers the package accepts.

Prints JSON: the transformers version, and per model (SmolLM2 from the directory given, tiny random
ZAYA and Qwen3-MoE) greedy tokens from ``model.generate``, from the backend one request at a time,
and from the backend with the requests arriving staggered into a running batch of three.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

PROMPTS = ["Hello there, how are you today?", "Name three colours of the rainbow, briefly.",
           "Summarise this. " + "The tide came in over the flats. " * 6]
NEW = 8


def tiny_models(tokenizer: Any) -> dict[str, Any]:
    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM, ZayaConfig, ZayaForCausalLM

    common = {"vocab_size": len(tokenizer), "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "head_dim": 16, "eos_token_id": tokenizer.eos_token_id,
              "pad_token_id": tokenizer.pad_token_id, "max_position_embeddings": 4096}
    torch.manual_seed(0)
    zaya = ZayaForCausalLM(ZayaConfig(**common, moe_intermediate_size=64, num_experts=4, router_hidden_size=16))
    torch.manual_seed(0)
    moe = Qwen3MoeForCausalLM(Qwen3MoeConfig(**common, intermediate_size=128, moe_intermediate_size=32,
                                             num_experts=4, num_experts_per_tok=2))
    return {"tiny_zaya": zaya.eval(), "tiny_qwen_moe": moe.eval()}


async def run(backend: Any, requests: list[Any]) -> dict[str, Any]:
    alone = [list((await backend.generate(r)).token_ids) for r in requests]

    async def later(i: int) -> list[int]:
        await asyncio.sleep(0.02 * i)
        return list((await backend.generate(requests[i])).token_ids)

    together = await asyncio.gather(*(later(i) for i in range(len(requests))))
    return {"alone": alone, "together": list(together), "joins": backend.stats.joins}


def main(model_dir: str) -> None:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from markov_rsa import GenerationRequest, SamplingParams
    from markov_rsa.backends.transformers import TransformersBackend

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    models = {"smollm2": AutoModelForCausalLM.from_pretrained(model_dir).eval(), **tiny_models(tokenizer)}
    requests = [GenerationRequest(({"role": "user", "content": p},), NEW, SamplingParams(temperature=0))
                for p in PROMPTS]
    out: dict[str, Any] = {"transformers": transformers.__version__, "models": {}}
    for name, model in models.items():
        backend = TransformersBackend(model_object=model, tokenizer_object=tokenizer, device="cpu", max_batch_size=3)
        try:
            reference = []
            for r in requests:
                ids = backend._prompt_ids(r)
                with torch.inference_mode():
                    full = model.generate(torch.tensor([ids]), max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                                          pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
                reference.append(full[0, len(ids):].tolist())
            out["models"][name] = {"reference": reference, **asyncio.run(run(backend, requests))}
        finally:
            backend.close()
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1])
