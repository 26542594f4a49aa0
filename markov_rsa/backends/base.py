"""The Backend protocol: what the engine needs from a model, and nothing more.

A backend turns one :class:`GenerationRequest` into one :class:`Generation`. The engine sends every
request of a round at once and awaits them concurrently, so a backend batches (local models) or
fans out (remote endpoints) as it sees fit. ``tokenize``/``detokenize`` use the model's own
tokenizer so that tails and chunk carry-overs are cut on exact model tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

#: A chat message as OpenAI's API has it: role and content (a string, or text parts), and for agent
#: conversations ``tool_calls`` (assistant) or ``tool_call_id`` (tool).
Message = dict[str, Any]
#: ``stop``, ``length`` and ``tool_calls`` end a generation normally; anything else a server reports
#: (``abort``, ``content_filter``...) is kept as it came, and the engine treats it as a failure.
FinishReason = str
NORMAL_FINISH: frozenset[str] = frozenset({"stop", "length", "tool_calls"})
TokenizerKind = Literal["exact", "approximate"]
#: Characters per token where no tokenizer is available; results then say counts were approximate.
APPROX_CHARS_PER_TOKEN = 4


@dataclass(frozen=True)
class SamplingParams:
    """Sampling of one request. Backends state every field to the server (``top_k=None`` as top-k
    disabled), so no server default can stand in for the method's settings."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class GenerationRequest:
    """One generation: chat messages, optionally continuing a partial assistant turn.

    ``assistant_prefix`` continues the assistant's reply (chunked rollouts carry their head and the
    previous chunk's end this way); ``assistant_prefix_ids`` holds the same text as model token ids
    for backends that can append them exactly.
    """

    messages: tuple[Message, ...]
    max_tokens: int
    sampling: SamplingParams = SamplingParams()
    assistant_prefix: str = ""
    assistant_prefix_ids: tuple[int, ...] | None = None
    #: Free-form labels for logs and tracing (round, index); backends must not depend on them.
    tags: dict[str, Any] = field(default_factory=dict, compare=False)
    #: Requests with the same key share a prompt prefix (one run's problem): a backend with several
    #: replicas sends them where that prefix is already cached.
    affinity: str | None = field(default=None, compare=False)
    #: Called with the number of tokens generated so far while a generation streams (from the
    #: backend's own task; it must be cheap and must not raise).
    on_progress: Callable[[int], None] | None = field(default=None, compare=False, repr=False)
    #: Tools the model may call (OpenAI format) and the caller's ``tool_choice``.
    tools: tuple[dict[str, Any], ...] = ()
    tool_choice: Any = None
    #: Further request fields for the server, passed as they are (``response_format``...).
    extra: dict[str, Any] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class Generation:
    """What came back: the answer section, the reasoning (if split out) and exact counts."""

    text: str
    finish_reason: FinishReason
    completion_tokens: int
    prompt_tokens: int
    reasoning: str | None = None
    reasoning_tokens: int | None = None
    token_ids: tuple[int, ...] | None = None
    #: Seconds the backend spent on this request, queueing included.
    latency: float = 0.0
    #: Tokens of earlier attempts that failed part-way: paid for, then thrown away.
    discarded_tokens: int = 0
    #: Prompt tokens the server found in its prefix cache, where it says.
    cached_prompt_tokens: int | None = None
    #: Requests this generation took (retries included).
    requests: int = 1
    #: Tool calls the model made (OpenAI format: id, type, function name and JSON arguments).
    tool_calls: tuple[dict[str, Any], ...] = ()
    #: The prompt ended inside a think block the chat template opened: the text starts as reasoning
    #: although it carries no ``<think>`` of its own (a thinking model's template, not a plain model).
    think_opened: bool = False


@dataclass(frozen=True)
class BackendInfo:
    """Recorded in every result so that a number can be traced to what produced it."""

    kind: str
    model: str
    device: str | None = None
    tokenizer: TokenizerKind = "exact"
    extra: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Backend(Protocol):
    """A model the engine can drive. Implementations must be safe to share between concurrent runs."""

    @property
    def info(self) -> BackendInfo: ...

    async def ready(self) -> None:
        """Resolve anything lazy (a server's tokenizer endpoints) before a run reads ``info``."""
        ...

    async def generate(self, request: GenerationRequest) -> Generation: ...

    async def tokenize(self, text: str) -> list[int]: ...

    async def detokenize(self, ids: Sequence[int]) -> str: ...

    async def aclose(self) -> None: ...
