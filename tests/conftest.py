"""Shared fixtures: the real embedded model, tiny random ZAYA/Qwen3-MoE models, and paths.

The demo model is converted into a per-session cache so every run exercises the GGUF conversion
(once) without touching the user's cache.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
DATASETS = SHARED / "datasets"


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = Path(os.environ.get("MARKOV_RSA_TEST_CACHE") or tmp_path_factory.mktemp("cache"))
    os.environ["MARKOV_RSA_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def demo_dir(cache_dir: Path) -> Path:
    from markov_rsa.backends.demo import demo_model_dir

    return demo_model_dir()


@pytest.fixture(scope="session")
def smol(demo_dir: Path):
    from markov_rsa.backends.transformers import TransformersBackend

    backend = TransformersBackend(demo_dir, device="cpu", name="smollm2-135m")
    yield backend
    backend.close()


@pytest.fixture(scope="session")
def tokenizer(demo_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(demo_dir)


@pytest.fixture(scope="session")
def tiny_zaya(tokenizer):
    import torch
    from transformers import ZayaConfig, ZayaForCausalLM

    torch.manual_seed(0)
    config = ZayaConfig(
        vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, moe_intermediate_size=64, num_experts=4, router_hidden_size=16,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=1,
        max_position_embeddings=4096,
    )
    return ZayaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def tiny_qwen_moe(tokenizer):
    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    config = Qwen3MoeConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=4,
        num_experts_per_tok=2, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        max_position_embeddings=4096,
    )
    return Qwen3MoeForCausalLM(config).eval()


@pytest.fixture(scope="session")
def math_dir() -> Path:
    path = DATASETS / "math"
    assert path.is_dir(), f"shared datasets missing at {path}"
    return path
