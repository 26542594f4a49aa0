"""RSAConfig validation and presets."""

from __future__ import annotations

import pytest

from markov_rsa import PRESETS, ConfigError, RSAConfig


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"k": 5, "population": 4}, "k"),
        ({"tail": 200, "budget": 100}, "tail"),
        ({"population": 0}, "population"),
        ({"budget": -1}, "budget"),
        ({"tail": 0}, "tail"),
        ({"rounds": -1}, "rounds"),
        ({"k": 0}, "k"),
        ({"final_n": 0}, "final_n"),
        ({"temperature": -0.5}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"tail_source": "everything"}, "tail_source"),
        ({"final": "best"}, "final"),
        ({"carryover": 10}, "carryover"),
        ({"chunk_size": 100, "carryover": 100}, "carryover"),
        ({"chunk_size": 100, "carryover": 50, "keep_head": 50}, "carryover"),
        ({"seed": -3}, "seed"),
        ({"population": 2.5}, "population"),
    ],
)
def test_invalid_settings_name_the_field(changes, field):
    with pytest.raises(ConfigError) as info:
        RSAConfig(**changes)
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}: ")


def test_published_presets():
    z = RSAConfig.from_preset("zaya-16k")
    assert (z.population, z.k, z.rounds, z.budget, z.tail) == (16, 4, 2, 16384, 4096)
    assert RSAConfig.from_preset("zaya-40k").budget == 40960
    light = RSAConfig.from_preset("light")
    assert (light.population, light.k, light.rounds, light.budget, light.tail) == (8, 4, 2, 8192, 4096)
    assert RSAConfig.from_preset("apex-high").rounds == 8
    paper = RSAConfig.from_preset("rsa-paper")
    assert (paper.rounds, paper.tail, paper.budget) == (9, 8192, 8192)
    d = RSAConfig.from_preset("delethink")
    assert (d.population, d.chunk_size, d.carryover, d.max_chunks) == (1, 8192, 4096, 5)
    p = RSAConfig.from_preset("parallel")
    assert p.rounds == 0 and p.final == "majority"
    assert set(PRESETS) >= {"zaya-16k", "zaya-40k", "light", "apex-high", "rsa-paper", "delethink", "parallel", "demo"}


def test_preset_overrides_and_unknown_names():
    cfg = RSAConfig.from_preset("light", rounds=5, tail=None)
    assert cfg.rounds == 5 and cfg.tail == 4096 and cfg.preset == "light"
    with pytest.raises(ConfigError, match=r"unknown preset 'nope'"):
        RSAConfig.from_preset("nope")
    with pytest.raises(ConfigError, match=r"^popsize: unknown setting"):
        RSAConfig.from_dict({"popsize": 3})


def test_config_is_frozen_and_serialisable():
    cfg = RSAConfig.from_preset("demo")
    with pytest.raises(AttributeError):
        cfg.k = 3  # type: ignore[misc]
    assert RSAConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.generations == cfg.population * (cfg.rounds + 1)
    assert RSAConfig(final="aggregate", final_n=2).generations == 16 * 3 + 2


def test_the_engine_and_remote_paths_never_import_torch():
    import subprocess
    import sys

    code = (
        "import sys, markov_rsa, markov_rsa.backends.openai, markov_rsa.server, markov_rsa.evals.runner\n"
        "from markov_rsa import MarkovianRSA, RSAConfig\n"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize(("preset", "budget"), [("parallel", 1000), ("delethink", 240)])
def test_a_budget_below_an_unused_tail_is_accepted(preset, budget):
    """Without aggregation no tail is carried, so τ > β changes nothing and is no error."""
    cfg = RSAConfig.from_preset(preset, budget=budget)
    assert cfg.budget == budget and not cfg.aggregates
    with pytest.raises(ConfigError, match=r"^tail: "):
        RSAConfig.from_preset("zaya-16k", budget=1000)


def test_the_default_config_is_the_default_preset():
    assert RSAConfig() == RSAConfig.from_preset("zaya-16k")
    assert RSAConfig().last_stage_budget == 40960
    assert RSAConfig(budget=2000, tail=100).last_stage_budget == 2000, "a budget set by hand is every stage's"
    assert RSAConfig.from_dict(RSAConfig().to_dict()) == RSAConfig()
