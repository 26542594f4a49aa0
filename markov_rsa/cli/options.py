"""Options shared by ``rsa solve``, ``rsa eval`` and ``rsa serve``: the backend and the RSA settings.

The flags are RSAConfig's field names with dashes, so the library, the CLI and result files use
one vocabulary.
"""

from __future__ import annotations

import functools
import inspect
import math
import typing
from collections.abc import Callable, Mapping
from typing import Annotated, Any, Literal

import typer

from markov_rsa.backends.factory import BackendOptions, build_backend
from markov_rsa.errors import ConfigError

__all__ = ["RSA_OPTIONS", "BackendOptions", "backend_options", "build_backend", "build_config", "rsa_options"]
from markov_rsa.rsa.config import PRESETS, RSAConfig
from markov_rsa.rsa.config import ChunkMode as ChunkModeName
from markov_rsa.rsa.config import FinalMode as FinalModeName
from markov_rsa.rsa.config import TailSource as TailSourceName

PRESET_HELP = "Named settings: " + "; ".join(f"{p.name}: {p.summary}" for p in PRESETS.values()) + "."

Preset = Annotated[str | None, typer.Option(help=PRESET_HELP + " Default: demo for the embedded model, else zaya-16k.")]
Population = Annotated[int | None, typer.Option(help="N: candidates per round.")]
K = Annotated[int | None, typer.Option("--k", help="K: tails in each aggregation prompt (the report's C).")]
Rounds = Annotated[int | None, typer.Option(help="T: aggregation rounds after round 0 (0 = parallel sampling).")]
Budget = Annotated[int | None, typer.Option(help="β: max new tokens of one rollout.")]
FinalBudget = Annotated[
    int | None, typer.Option(help="Max new tokens of the last stage (round T or the final aggregation); default β "
                                  "(a preset's own, unless --budget is given).")
]
PromptVersion = Annotated[
    str | None, typer.Option(help="Prompt-set version: 2 (current: instruction after the candidates, shuffled) or 1.")
]
Tail = Annotated[int | None, typer.Option(help="τ: model tokens carried per candidate (τ = β is full-chain RSA).")]
ChunkSize = Annotated[int | None, typer.Option(help="C: produce each rollout in chunks of this many tokens.")]
Carryover = Annotated[int | None, typer.Option(help="m: tokens of the previous chunk carried into the next.")]
MaxChunks = Annotated[int | None, typer.Option(help="I: most chunks per rollout (default: as many as fit β).")]
KeepHead = Annotated[int | None, typer.Option(help="First generated tokens kept in every chunk prompt.")]
FinalN = Annotated[int | None, typer.Option(help="Final aggregations when --final aggregate.")]
Temperature = Annotated[float | None, typer.Option(help="Sampling temperature of every rollout.")]
TopP = Annotated[float | None, typer.Option(help="Nucleus sampling threshold.")]
TopK = Annotated[int | None, typer.Option(help="Top-k sampling cut-off.")]
FinalTemperature = Annotated[float | None, typer.Option(help="Temperature of the final aggregations.")]
Seed = Annotated[int | None, typer.Option(help="Seed of subset sampling and of every request (random if unset).")]
TokenBudget = Annotated[int | None, typer.Option(help="Stop the run after this many generated tokens.")]
EarlyExit = Annotated[float | None, typer.Option(
    help="Consensus early exit: stop once this share of a round's population agrees with its vote (0.9; 1 = "
         "unanimous), and let that round vote. Off unless set (or an -adaptive preset).")]
MinRounds = Annotated[int | None, typer.Option(help="With --early-exit: the earliest round that may stop the run.")]
TimeLimit = Annotated[float | None, typer.Option(help="Stop the run after this many seconds.")]

Model = Annotated[
    str | None,
    typer.Option(help="Local model (Hub id such as Zyphra/ZAYA1-8B, directory or .gguf), or with --base-url "
                 "the served model name."),
]
BaseUrl = Annotated[
    list[str] | None,
    typer.Option(help="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1 (repeat for replicas)."),
]
ApiKeyEnv = Annotated[str | None, typer.Option(help="Environment variable holding the endpoint's API key.")]
Tokenizer = Annotated[
    str | None, typer.Option(help="Hugging Face tokenizer for remote tails when the server has no tokenize endpoint.")
]
BackendKind = Annotated[
    Literal["auto", "local", "openai", "demo"],
    typer.Option(help="auto (from --base-url/--model), local (transformers, needs --model), openai (needs "
                      "--base-url and --model) or demo (the embedded model)."),
]
Device = Annotated[str, typer.Option(help="Local backend device: auto, cpu, cuda (ROCm GPUs are cuda too).")]
Dtype = Annotated[Literal["auto", "bfloat16", "float16", "float32"],
                  typer.Option(help="Local backend dtype: auto is bf16 on GPU, fp32 on CPU.")]
MaxConcurrency = Annotated[int | None, typer.Option(
    min=1, help="Most requests in flight at once: remote, open requests (default 64); local, rows in the running "
                "batch (default 16).")]
def _positive_seconds(value: float) -> float:
    if not math.isfinite(value) or value <= 0:
        raise typer.BadParameter(f"must be a positive number of seconds, got {value:g}")
    return value


Timeout = Annotated[float, typer.Option(
    callback=_positive_seconds,
    help="Remote backend: seconds for the connect and the longest silence once a reply has started (a generation "
         "may stream far longer; a request queued on a busy server waits while the server answers /health).")]
RoutingFlag = Annotated[Literal["affinity", "least-busy"], typer.Option(
    "--routing", help="Remote backend with several --base-url: affinity sends a run's requests where its prompt "
                      "prefix is cached while that replica has a free slot; least-busy ignores the prefix.")]


ChunkMode = Annotated[ChunkModeName | None, typer.Option(
    help="How C is read: new (each chunk generates C tokens) or context (Delethink: the first chunk generates C, "
         "later ones C − m).")]
TailSource = Annotated[TailSourceName | None, typer.Option(
    help="What is carried between rounds: reasoning, answer, hybrid (the answer once there is one) or full "
         "(everything the candidate wrote, reasoning then answer).")]
Final = Annotated[FinalModeName | None, typer.Option(help="Final selection.")]
FinalTopP = Annotated[float | None, typer.Option(help="Nucleus threshold of the final aggregations.")]
FinalTopK = Annotated[int | None, typer.Option(help="Top-k cut-off of the final aggregations.")]
CandidateRetries = Annotated[int | None, typer.Option(
    help="Times a candidate whose requests failed is issued again before it is recorded as failed.")]
Stop = Annotated[list[str] | None, typer.Option(help="A stop sequence of every rollout (repeat for more).")]

#: Every RSAConfig setting a command can take, defined once: ``solve`` and ``eval`` both get them all
#: through :func:`rsa_options` (``task`` is a command's own: the benchmark decides it for ``eval``).
RSA_OPTIONS: dict[str, Any] = {
    "preset": Preset, "population": Population, "k": K, "rounds": Rounds, "budget": Budget,
    "final_budget": FinalBudget, "tail": Tail, "chunk_size": ChunkSize, "chunk_mode": ChunkMode,
    "carryover": Carryover, "max_chunks": MaxChunks, "keep_head": KeepHead, "tail_source": TailSource,
    "final": Final, "final_n": FinalN, "temperature": Temperature, "top_p": TopP, "top_k": TopK, "stop": Stop,
    "final_temperature": FinalTemperature, "final_top_p": FinalTopP, "final_top_k": FinalTopK, "seed": Seed,
    "prompt_version": PromptVersion, "token_budget": TokenBudget, "time_limit": TimeLimit,
    "candidate_retries": CandidateRetries, "early_exit": EarlyExit, "min_rounds": MinRounds,
}


def rsa_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Give a command every RSA flag; it receives them as ``rsa``: a dict of the ones that were set."""
    signature = inspect.signature(command)
    hints = typing.get_type_hints(command, include_extras=True)  # the command's annotations, evaluated
    own = [p.replace(annotation=hints.get(p.name, p.annotation), kind=inspect.Parameter.KEYWORD_ONLY)
           for p in signature.parameters.values() if p.name != "rsa"]
    added = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=annotation)
             for name, annotation in RSA_OPTIONS.items()]

    @functools.wraps(command)
    def wrapper(**kwargs: Any) -> Any:
        rsa = {name: kwargs.pop(name) for name in RSA_OPTIONS if name in kwargs}
        return command(rsa=rsa, **kwargs)

    parameters = [*own, *added]
    wrapper.__signature__ = signature.replace(parameters=parameters)  # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in parameters}
    return wrapper


def backend_options(values: Mapping[str, Any], *, key_env_param: str = "api_key_env") -> BackendOptions:
    """BackendOptions from a command's parameters; ``key_env_param`` names the parameter holding the
    upstream key's variable (``rsa serve`` keeps ``--api-key-env`` for its own token)."""
    return BackendOptions(
        backend=values.get("backend") or "auto", model=values["model"], base_url=tuple(values["base_url"] or ()),
        api_key_env=values.get(key_env_param),
        tokenizer=values["tokenizer"], device=values["device"], dtype=values["dtype"],
        max_concurrency=values["max_concurrency"], timeout=values["timeout"],
        routing=values.get("routing") or "affinity",
    )


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def build_config(preset: str | None, embedded: bool, **fields: Any) -> RSAConfig:
    """The run's config: the preset (``demo`` for the embedded model, else ``zaya-16k``) with the flags
    that were given. A flag that would change nothing in this run is an error naming the fix."""
    name = preset or ("demo" if embedded else "zaya-16k")
    if fields.get("stop") is not None:
        fields["stop"] = tuple(fields["stop"]) or None
    config = RSAConfig.from_preset(name, **fields)
    given = {key for key, value in fields.items() if value is not None}
    if config.final != "aggregate":
        for key in ("final_n", "final_temperature", "final_top_p", "final_top_k"):
            if key in given:
                raise ConfigError(key, f"{_flag(key)} only applies to a final aggregation; add --final aggregate "
                                       f"or drop {_flag(key)}")
    if "chunk_size" in given and config.chunk_size is not None and config.chunk_size > config.budget:
        raise ConfigError("chunk_size", f"--chunk-size ({config.chunk_size}) exceeds --budget ({config.budget}), so "
                                        "rollouts would never be chunked; lower it or raise --budget")
    return config
