"""RSAConfig: the one vocabulary shared by the library, the CLI flags and the result files.

Field names follow the issue tracker's contract (``population`` is N, ``k`` is K, ``rounds`` is T,
``budget`` is β, ``tail`` is τ); the CLI flags are the same names with dashes, and results store
``RSAConfig.to_dict()`` verbatim, so a result file can be replayed with ``RSAConfig.from_dict``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from markov_rsa.errors import ConfigError

#: What a candidate carries: its ``reasoning``, its ``answer`` section, ``hybrid`` (the answer when it has one,
#: else the reasoning) or ``full`` (everything it wrote, reasoning then answer, as full-chain RSA carries).
TailSource = Literal["reasoning", "answer", "hybrid", "full"]
FinalMode = Literal["majority", "aggregate", "population"]
TaskName = Literal["math", "code", "generic"]
#: How ``chunk_size`` (C) is read: ``new`` gives every chunk C new tokens; ``context`` treats C as a
#: chunk's whole reasoning context as Delethink's reference code does (the first chunk generates C
#: tokens, later ones C − m, since m carried tokens already fill the rest).
ChunkMode = Literal["new", "context"]

#: ``final_budget``'s default: resolved to the default preset's 40960, or to β when β was given.
UNSET_FINAL_BUDGET = -1
DEFAULT_BUDGET = 16384
DEFAULT_FINAL_BUDGET = 40960

TAIL_SOURCES: tuple[str, ...] = get_args(TailSource)
FINAL_MODES: tuple[str, ...] = get_args(FinalMode)
TASKS: tuple[str, ...] = get_args(TaskName)
CHUNK_MODES: tuple[str, ...] = get_args(ChunkMode)


@dataclass(frozen=True)
class RSAConfig:
    """Parameters of one Markovian RSA run.

    Round 0 draws ``population`` independent rollouts of at most ``budget`` new tokens. Each of the
    ``rounds`` aggregation rounds then regenerates the population from prompts holding ``k`` tails,
    each the last ``tail`` model tokens of a candidate of the previous round. ``rounds=0`` is
    parallel sampling, ``tail == budget`` is full-chain RSA, ``k=1`` is bounded continuation (child
    i continues parent i, so every lineage lives on).

    ``final_budget`` is the max new tokens of the last stage (round T, or the final aggregation
    when ``final="aggregate"``); the ZAYA1-8B report gives it 40K whatever β is.

    ``RSAConfig()`` is the ``zaya-16k`` preset, as the CLI's default with a real model: left unset,
    ``final_budget`` is 40960 with the default β and β itself when β is given (a budget set by hand
    is every stage's unless said otherwise, as ``--budget`` does).
    """

    population: int = 16
    k: int = 4
    rounds: int = 2
    budget: int = DEFAULT_BUDGET
    tail: int = 4096
    #: Max new tokens of the last stage; ``None`` means ``budget`` (see the class docstring for the default).
    final_budget: int | None = UNSET_FINAL_BUDGET
    # Fixed-length chunked rollouts (Delethink); ``chunk_size=None`` means one generation per rollout.
    chunk_size: int | None = None
    carryover: int | None = None
    max_chunks: int | None = None
    keep_head: int = 0
    chunk_mode: ChunkMode = "new"
    tail_source: TailSource = "reasoning"
    final: FinalMode = "majority"
    final_n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    #: Stop sequences of every rollout (a chat request's ``stop``).
    stop: tuple[str, ...] = ()
    final_temperature: float | None = None
    final_top_p: float | None = None
    final_top_k: int | None = None
    seed: int | None = None
    task: TaskName = "math"
    #: Prompt-set version (``None``: the current one); results record name, version and fingerprint.
    prompt_version: str | None = None
    # Per-run limits: when either is reached the run ends with the best answer so far and says so.
    token_budget: int | None = None
    time_limit: float | None = None
    #: Consensus early exit: after a complete round (and at least ``min_rounds``), when this share of the
    #: population agrees with the vote (1.0: unanimous), the run stops and that round votes.
    early_exit: float | None = None
    min_rounds: int = 0
    # How many times the engine re-issues a request whose backend gave up, before recording it failed.
    candidate_retries: int = 1
    preset: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.stop, (list, str)):  # from JSON, or a single sequence
            object.__setattr__(self, "stop", (self.stop,) if isinstance(self.stop, str) else tuple(self.stop))
        if self.final_budget == UNSET_FINAL_BUDGET:
            object.__setattr__(self, "final_budget", DEFAULT_FINAL_BUDGET if self.budget == DEFAULT_BUDGET else None)
        _validate(self)

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> RSAConfig:
        """Build a config from a named preset; ``overrides`` set any field (``None`` values are ignored)."""
        if name not in PRESETS:
            raise ConfigError("preset", f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        given = {k: v for k, v in overrides.items() if v is not None}
        values = {"final_budget": None, **PRESETS[name].values, **given}
        if "budget" in given and "final_budget" not in given:
            values["final_budget"] = None  # a budget set by hand is every stage's unless said otherwise
        if "early_exit" not in given and not values.get("rounds") and values.get("final") != "aggregate":
            values.pop("early_exit", None)  # an -adaptive preset run as one stage: nothing to stop early
        return cls.from_dict({**values, "preset": name})

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RSAConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(unknown[0], f"unknown setting; known settings are {', '.join(sorted(names))}")
        return cls(**dict(data))

    def replace(self, **changes: Any) -> RSAConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # -- derived values -----------------------------------------------------------------------
    @property
    def chunked(self) -> bool:
        return self.chunk_size is not None

    @property
    def effective_max_chunks(self) -> int:
        """Chunks a rollout may use: the explicit limit, else as many as fit in the budget."""
        if self.chunk_size is None:
            return 1
        if self.max_chunks is not None:
            return self.max_chunks
        if self.chunk_mode == "context" and self.budget > self.chunk_size:
            return 1 + math.ceil((self.budget - self.chunk_size) / (self.chunk_size - (self.carryover or 0)))
        return max(1, math.ceil(self.budget / self.chunk_size))

    @property
    def aggregates(self) -> bool:
        """Whether any stage aggregates candidates (only then does ``k`` matter)."""
        return self.rounds > 0 or self.final == "aggregate"

    @property
    def last_stage_budget(self) -> int:
        return self.final_budget if self.final_budget is not None else self.budget

    @property
    def generations(self) -> int:
        """Rollouts in a complete run: N per stage, T+1 stages, plus the final aggregations."""
        extra = self.final_n if self.final == "aggregate" else 0
        return self.population * (self.rounds + 1) + extra


def _positive_int(cfg: RSAConfig, name: str, *, allow_none: bool = False, minimum: int = 1) -> None:
    value = getattr(cfg, name)
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(name, f"must be an integer, got {value!r}")
    if value < minimum:
        raise ConfigError(name, f"must be at least {minimum}, got {value}")


def _validate(cfg: RSAConfig) -> None:
    for name in ("population", "k", "budget", "tail", "final_n"):
        _positive_int(cfg, name)
    _positive_int(cfg, "final_budget", allow_none=True)
    _positive_int(cfg, "rounds", minimum=0)
    _positive_int(cfg, "keep_head", minimum=0)
    _positive_int(cfg, "candidate_retries", minimum=0)
    for name in ("chunk_size", "max_chunks", "top_k", "final_top_k", "token_budget"):
        _positive_int(cfg, name, allow_none=True)
    _positive_int(cfg, "carryover", allow_none=True, minimum=0)
    if cfg.seed is not None and (isinstance(cfg.seed, bool) or not isinstance(cfg.seed, int) or cfg.seed < 0):
        raise ConfigError("seed", f"must be a non-negative integer, got {cfg.seed!r}")
    if cfg.k > cfg.population and cfg.aggregates:
        raise ConfigError("k", f"aggregation set size ({cfg.k}) must not exceed population ({cfg.population})")
    if cfg.tail > cfg.budget and cfg.aggregates:  # without aggregation no tail is carried
        raise ConfigError("tail", f"tail ({cfg.tail}) must not exceed the per-rollout budget ({cfg.budget})")
    for name in ("temperature", "final_temperature"):
        value = getattr(cfg, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value) or value < 0):
            raise ConfigError(name, f"must be a number >= 0, got {value!r}")
    for name in ("top_p", "final_top_p"):
        value = getattr(cfg, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not 0 < value <= 1):
            raise ConfigError(name, f"must be in (0, 1], got {value!r}")
    if cfg.time_limit is not None and (isinstance(cfg.time_limit, bool) or not isinstance(cfg.time_limit, (int, float))
                                       or not math.isfinite(cfg.time_limit) or cfg.time_limit <= 0):
        raise ConfigError("time_limit", f"must be a positive number of seconds, got {cfg.time_limit!r}")
    if not isinstance(cfg.stop, tuple) or len(cfg.stop) > 8 or not all(
            isinstance(x, str) and 0 < len(x) <= 200 for x in cfg.stop):
        raise ConfigError("stop", "must be at most 8 non-empty strings of at most 200 characters")
    _validate_early_exit(cfg)
    if cfg.prompt_version is not None and not isinstance(cfg.prompt_version, str):
        raise ConfigError("prompt_version", f"must be a version string such as '2', got {cfg.prompt_version!r}")
    for name, allowed in (("tail_source", TAIL_SOURCES), ("final", FINAL_MODES), ("task", TASKS),
                          ("chunk_mode", CHUNK_MODES)):
        if getattr(cfg, name) not in allowed:
            raise ConfigError(name, f"must be one of {', '.join(allowed)}, got {getattr(cfg, name)!r}")
    if cfg.chunk_size is None:
        if cfg.chunk_mode != "new":
            raise ConfigError("chunk_mode", "only applies to chunked rollouts; set chunk_size as well")
        for name in ("carryover", "max_chunks"):
            if getattr(cfg, name) is not None:
                raise ConfigError(name, "only applies to chunked rollouts; set chunk_size as well")
        return
    carry = cfg.carryover if cfg.carryover is not None else 0
    if carry + cfg.keep_head >= cfg.chunk_size:
        raise ConfigError(
            "carryover",
            f"carryover ({carry}) + keep_head ({cfg.keep_head}) must be smaller than chunk_size ({cfg.chunk_size})",
        )


def _validate_early_exit(cfg: RSAConfig) -> None:
    value = cfg.early_exit
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                              or not math.isfinite(value) or not 0 < value <= 1):
        raise ConfigError("early_exit", f"must be a share of the population in (0, 1] (1 = unanimous), got {value!r}")
    _positive_int(cfg, "min_rounds", minimum=0)
    if value is not None and not cfg.aggregates:
        raise ConfigError("early_exit", "a run of one stage (rounds 0, no final aggregation) has nothing to stop "
                                        "early; set rounds above 0 or drop early_exit")
    if cfg.min_rounds and value is None:
        raise ConfigError("min_rounds", "only applies with early_exit; set early_exit as well")
    if cfg.min_rounds > cfg.rounds:
        raise ConfigError("min_rounds", f"min_rounds ({cfg.min_rounds}) exceeds rounds ({cfg.rounds}), so early "
                                        "exit could never happen; lower it")


@dataclass(frozen=True)
class Preset:
    name: str
    summary: str
    values: Mapping[str, Any]


def _presets(*items: Preset) -> dict[str, Preset]:
    return {p.name: p for p in items}


PRESETS: Mapping[str, Preset] = _presets(
    Preset(
        "zaya-16k",
        "ZAYA1-8B report's recommended deployment: N16 K4 T2, β=16K, τ=4K, final budget 40K",
        {"population": 16, "k": 4, "rounds": 2, "budget": 16384, "tail": 4096, "final_budget": 40960},
    ),
    Preset(
        "zaya-40k",
        "ZAYA1-8B report's headline setting: N16 K4 T2, β=40K, τ=4K, final budget 40K",
        {"population": 16, "k": 4, "rounds": 2, "budget": 40960, "tail": 4096, "final_budget": 40960},
    ),
    Preset(
        "light",
        "the report's lightweight setting: N8 K4 T2, β=8K, τ=4K, final budget 40K",
        {"population": 8, "k": 4, "rounds": 2, "budget": 8192, "tail": 4096, "final_budget": 40960},
    ),
    Preset(
        "apex-high",
        "long recursion: N16 K4 T8, β=16K, τ=4K, final budget 40K",
        {"population": 16, "k": 4, "rounds": 8, "budget": 16384, "tail": 4096, "final_budget": 40960},
    ),
    Preset(
        "rsa-paper",
        "original full-chain RSA (arXiv:2509.26626): N16 K4 T9, τ=β=8K, whole replies carried",
        {"population": 16, "k": 4, "rounds": 9, "budget": 8192, "tail": 8192, "tail_source": "full"},
    ),
    Preset(
        "delethink",
        "one Delethink rollout (24K): C=8K context per chunk, m=4K carried, first 100 tokens kept, 5 chunks, "
        "temperature 0.6 as Delethink's reference",
        {
            "population": 1, "k": 1, "rounds": 0, "budget": 24576, "tail": 4096,
            "chunk_size": 8192, "carryover": 4096, "max_chunks": 5, "keep_head": 100, "chunk_mode": "context",
            "temperature": 0.6,
        },
    ),
    Preset(
        "parallel",
        "parallel sampling with majority vote: N16, T0, β=16K",
        {"population": 16, "k": 4, "rounds": 0, "budget": 16384, "tail": 4096, "final": "majority"},
    ),
    Preset(
        "demo",
        "a minute on 2 CPU cores with a 135M model: N4 K2 T1, β=96, τ=48",
        {
            "population": 4, "k": 2, "rounds": 1, "budget": 96, "tail": 48,
            "temperature": 0.7, "top_p": 0.95, "seed": 0,
        },
    ),
)
#: Consensus early exit at 0.9 agreement: an ``-adaptive`` variant of each preset that mirrors a published
#: setting (those presets themselves keep every round, fidelity first).
ADAPTIVE_EARLY_EXIT = 0.9
PRESETS = {
    **PRESETS,
    **{f"{name}-adaptive": Preset(f"{name}-adaptive", f"{PRESETS[name].summary}; stops early at "
                                                      f"{ADAPTIVE_EARLY_EXIT:.0%} agreement",
                                  {**PRESETS[name].values, "early_exit": ADAPTIVE_EARLY_EXIT})
       for name in ("zaya-16k", "zaya-40k", "light", "apex-high", "rsa-paper")},
}
