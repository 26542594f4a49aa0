"""TransformersBackend: any causal LM that transformers loads, batched, on ROCm, CUDA or CPU.

All model work runs on one worker thread that keeps a running batch (``local_batch``): between
decode steps, finished or cancelled rows leave it and waiting requests are prefilled and join it,
up to ``max_batch_size`` rows. A ragged round therefore never computes padding for rows that
ended, and the next round of another problem (or a second ``rsa serve`` request) starts as soon
as there is room rather than when the whole batch has drained. Sampling is done per row with the
row's own seeded generator and stops are checked per row. Logits still differ at rounding level
with the batch's shape, so what is guaranteed is: greedy tokens on CPU equal the request run alone,
and a seeded sampled request is reproducible for the same arrival pattern.

Identical prompts that join together are prefilled once and their cache expanded to every row
with ``Cache.reorder_cache``, which is correct for recurrent/convolutional layers (ZAYA's CCA) as
well as attention: round 0's N identical prompts cost one prefill.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import math
import queue
import re
import secrets
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from markov_rsa.backends.base import BackendInfo, Generation, GenerationRequest
from markov_rsa.backends.local_batch import Admission, Row, RunningBatch
from markov_rsa.errors import BackendRequestError, BackendUnavailableError, MissingDependencyError

_INSTALL_HINT = "install the local backend with: pip install 'markov-rsa[local]'"
#: The lowest transformers the local backend runs on, as pyproject's ``local`` extra says: earlier
#: 5.x releases take the cache under another keyword and hold linear-attention state in another
#: layout, which would run every step without its context rather than fail.
TRANSFORMERS_FLOOR = (5, 24)


def _release(version: str) -> tuple[int, ...]:
    """``"5.24.0.dev0"`` -> ``(5, 24, 0)``: the leading numeric release."""
    match = re.match(r"\d+(?:\.\d+)*", version)
    return tuple(int(p) for p in match.group(0).split(".")) if match else ()


def check_transformers(version: str) -> None:
    """Refuse a transformers older than the floor, with the command that fixes it."""
    if _release(version) < TRANSFORMERS_FLOOR:
        floor = ".".join(map(str, TRANSFORMERS_FLOOR))
        raise MissingDependencyError(
            f"transformers: the local backend needs {floor} or later, found {version}; "
            f"pip install 'transformers>={floor}'")


def _import_torch() -> Any:
    try:
        import torch
        import transformers
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        raise MissingDependencyError(f"the local backend needs torch and transformers; {_INSTALL_HINT}") from exc
    check_transformers(transformers.__version__)
    return torch


def select_device(torch: Any, requested: str = "auto") -> tuple[str, str]:
    """(torch device, honest platform name). ROCm builds expose the GPU as ``cuda``."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise BackendRequestError("device: no GPU is visible to torch; use --device cpu")
        return requested, "rocm" if getattr(torch.version, "hip", None) else "cuda"
    return requested, requested.split(":")[0]


@dataclass
class _Item:
    request: GenerationRequest
    future: concurrent.futures.Future[Generation]
    enqueued: float = field(default_factory=time.perf_counter)
    #: Set by the caller's side when it stops waiting; a running future cannot be cancelled, so
    #: the worker reads this flag to stop the row at its next step.
    abandoned: bool = False

    @property
    def cancelled(self) -> bool:
        return self.abandoned or self.future.cancelled()


@dataclass
class BatchStats:
    """Counters for benchmarks and tests: how work was batched, shared and kept.

    ``batches`` counts prefills (a group of requests prefilled together) and ``joins`` the times
    rows joined a batch already running. ``row_steps`` counts rows fed to decode steps and
    ``kept_tokens`` the tokens of the completions returned (an end-of-text token, text past a stop
    string and cancelled rows are not kept), so ``kept_tokens / row_steps`` is the share of decode
    work that was not wasted. ``cache_rows`` (running rows) and ``cache_bytes`` (running and staged
    rows' cache) are read from the cache tensors after the latest step; ``peak_rows`` is the most
    running rows and ``peak_cache_bytes`` the most cache bytes held at once, the copy a join makes
    while it merges included:
    the batch never holds more than ``max_batch_size`` rows.
    The worker updates its own instance; ``TransformersBackend.stats`` hands out copies.
    """

    batches: int = 0
    joins: int = 0
    rows: int = 0
    prefill_tokens: int = 0
    prefill_tokens_saved: int = 0
    steps: int = 0
    row_steps: int = 0
    kept_tokens: int = 0
    cache_rows: int = 0
    cache_bytes: int = 0
    peak_rows: int = 0
    peak_cache_bytes: int = 0


#: Most stop strings one request may carry (each is searched for after every step).
MAX_STOPS = 16


def _real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _integer(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def validate_request(request: GenerationRequest, vocab: int) -> None:
    """Refuse a request the worker could not run correctly, naming the field and the fix.

    Run on the caller's side before the request joins a batch, so a bad request fails alone.
    """
    if not _integer(request.max_tokens) or request.max_tokens < 0:
        raise BackendRequestError(f"max_tokens: must be a whole number >= 0, got {request.max_tokens!r}", 400)
    sampling = request.sampling
    if not _real(sampling.temperature) or sampling.temperature < 0:
        raise BackendRequestError(f"temperature: must be a finite number >= 0 (0 = greedy), got "
                                  f"{sampling.temperature!r}", 400)
    if not _real(sampling.top_p) or not 0 < sampling.top_p <= 1:
        raise BackendRequestError(f"top_p: must be in (0, 1], got {sampling.top_p!r}", 400)
    if sampling.top_k is not None and (not _integer(sampling.top_k) or sampling.top_k < 0):
        raise BackendRequestError(f"top_k: must be a whole number >= 1, or None for off, got {sampling.top_k!r}",
                                  400)
    if sampling.seed is not None and not _integer(sampling.seed):
        raise BackendRequestError(f"seed: must be a whole number or None, got {sampling.seed!r}", 400)
    stop = sampling.stop
    if not isinstance(stop, (tuple, list)) or not all(isinstance(s, str) and s for s in stop):
        raise BackendRequestError(f"stop: must be a tuple of non-empty strings, got {stop!r}", 400)
    if len(stop) > MAX_STOPS:
        raise BackendRequestError(f"stop: at most {MAX_STOPS} stop strings, got {len(stop)}", 400)
    prefix = request.assistant_prefix_ids
    if prefix is not None and not all(_integer(t) and 0 <= t < vocab for t in prefix):
        raise BackendRequestError(f"assistant_prefix_ids: every id must be a whole number in [0, {vocab}) "
                                  "(the model's vocabulary)", 400)


@dataclass
class _Recovery:
    """After a failed decode step: which row caused it, found without failing the others.

    The failed step's cache cannot be trusted (some layers may have been updated), so every row it
    held becomes a *suspect*: re-prefilled alone from its prompt and the tokens it has, and let back
    into the batch one per step (*on probation* until a step with it succeeds). A step that fails
    with a row on probation fails that row only; a step of one row fails that row. Each failure
    thus fails one request, and the others go on with the tokens they had.
    """

    suspects: collections.deque[Row] = field(default_factory=collections.deque)
    probation: Row | None = None

    @property
    def active(self) -> bool:
        return bool(self.suspects) or self.probation is not None


def _fail_rows(rows: Sequence[Row], error: Exception) -> None:
    """Fail the requests of ``rows`` that are still waiting for a result."""
    for row in rows:
        if not row.owner.future.done():
            row.owner.future.set_exception(error)


class TransformersBackend:
    """A local model. ``model`` is a Hub id, a local directory, or a directory holding ``gguf_file``."""

    def __init__(
        self,
        model: str | Path | None = None,
        *,
        gguf_file: str | None = None,
        device: str = "auto",
        dtype: str = "auto",
        max_batch_size: int = 16,
        prefix_sharing: bool = True,
        batch_window: float = 0.005,
        max_padding: float = 0.5,
        trust_remote_code: bool = False,
        model_object: Any = None,
        tokenizer_object: Any = None,
        name: str | None = None,
    ) -> None:
        if not 0 <= max_padding <= 1:
            raise BackendRequestError(f"max_padding: must be in [0, 1] (share of the cache), got {max_padding}")
        if max_batch_size < 1:
            raise BackendRequestError(f"max_batch_size: must be at least 1, got {max_batch_size}")
        torch = _import_torch()
        self._torch = torch
        self._device, platform = select_device(torch, device)
        if model_object is not None:
            self.model, self.tokenizer = model_object, tokenizer_object
            self.model.to(self._device)
        else:
            if model is None:
                raise BackendRequestError("model: give a Hub id, a local directory or a GGUF file")
            self.model, self.tokenizer = self._load(str(model), gguf_file, dtype, trust_remote_code)
        self.model.eval()
        if self.tokenizer is None:
            raise BackendRequestError("tokenizer: the local backend needs the model's tokenizer")
        eos = self._eos_ids()
        self._eos_set = frozenset(eos)
        self._pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else eos[0]
        self._info = BackendInfo(
            kind="transformers",
            model=name or str(model or getattr(self.model.config, "_name_or_path", "model")),
            device=platform,
            tokenizer="exact",
            extra={"dtype": str(self.model.dtype).replace("torch.", ""), "model_type": self.model.config.model_type},
        )
        embeddings = self.model.get_input_embeddings() if hasattr(self.model, "get_input_embeddings") else None
        self._vocab = int(getattr(embeddings, "num_embeddings", 0) or self.model.config.vocab_size)
        #: Positions the model was built for (None where the config does not say): prompt plus
        #: max_tokens must fit, or positions past it would run silently wrong (or fail the batch).
        self._context: int | None = getattr(self.model.config, "max_position_embeddings", None)
        self.max_batch_size = max_batch_size
        self.prefix_sharing = prefix_sharing
        self.batch_window = batch_window
        self.max_padding = max_padding
        self._tok_lock = threading.Lock()
        self._queue: queue.Queue[_Item | None] = queue.Queue()
        self._stats = BatchStats()
        self._closed = False
        self._stopping = threading.Event()
        self._worker = threading.Thread(target=self._work, name="markov-rsa-transformers", daemon=True)
        self._worker.start()

    # -- loading ------------------------------------------------------------------------------
    def _load(self, model: str, gguf_file: str | None, dtype: str, trust_remote_code: bool) -> tuple[Any, Any]:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch = self._torch
        if dtype == "auto":
            torch_dtype = torch.bfloat16 if self._device != "cpu" else torch.float32
        else:
            torch_dtype = getattr(torch, dtype, None)
            if torch_dtype is None:
                raise BackendRequestError(f"dtype: unknown torch dtype {dtype!r}; use bfloat16, float16 or float32")
        path = Path(model)
        if gguf_file is None and path.suffix == ".gguf" and path.is_file():
            model, gguf_file = str(path.parent), path.name
        kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
        if gguf_file:
            kwargs["gguf_file"] = gguf_file
        try:
            tokenizer = AutoTokenizer.from_pretrained(model, **kwargs)
            loaded = AutoModelForCausalLM.from_pretrained(model, dtype=torch_dtype, **kwargs)
        except OSError as exc:
            raise BackendRequestError(
                f"model: could not load {model!r} ({str(exc).splitlines()[0]}); give a Hub id, a local "
                "model directory or a .gguf file"
            ) from exc
        return loaded, tokenizer

    def _eos_ids(self) -> list[int]:
        ids: list[int] = []
        for source in (getattr(self.model, "generation_config", None), self.model.config):
            value = getattr(source, "eos_token_id", None) if source is not None else None
            if value is not None:
                ids.extend(value if isinstance(value, list) else [value])
        if self.tokenizer.eos_token_id is not None:
            ids.append(self.tokenizer.eos_token_id)
        return list(dict.fromkeys(ids)) or [0]

    # -- Backend protocol ---------------------------------------------------------------------
    @property
    def info(self) -> BackendInfo:
        return self._info

    @property
    def stats(self) -> BatchStats:
        return dataclasses.replace(self._stats)

    async def ready(self) -> None:
        return None

    async def generate(self, request: GenerationRequest) -> Generation:
        if request.tools:
            raise BackendRequestError("tools: the local backend does not run tool calls; serve through an "
                                      "OpenAI-compatible backend (--base-url) for agent requests", 400)
        if self._closed:
            raise BackendUnavailableError("the local backend was closed")
        validate_request(request, self._vocab)
        future: concurrent.futures.Future[Generation] = concurrent.futures.Future()
        item = _Item(request, future)
        self._queue.put(item)
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            item.abandoned = True  # a running row stops at its next step
            future.cancel()  # a queued request is dropped before it runs
            raise

    async def tokenize(self, text: str) -> list[int]:
        with self._tok_lock:
            return list(self.tokenizer.encode(text, add_special_tokens=False))

    async def detokenize(self, ids: Sequence[int]) -> str:
        with self._tok_lock:
            return str(self.tokenizer.decode(list(ids), skip_special_tokens=False))

    async def aclose(self) -> None:
        """close() on a thread: waiting for the worker to finish its step (a long prefill may take
        seconds) never blocks the event loop."""
        await asyncio.to_thread(self.close)

    def close(self) -> None:
        """Stop running rows at their next step, fail queued requests, and wait for the worker."""
        if not self._closed:
            self._closed = True
            self._stopping.set()
            self._queue.put(None)
            if threading.current_thread() is not self._worker:
                self._worker.join(timeout=60)

    # -- the worker ---------------------------------------------------------------------------
    def _work(self) -> None:
        batch = RunningBatch(self.model, self._torch, self._device, self._pad, self.prefix_sharing,
                             self.max_padding)
        waiting: collections.deque[_Item] = collections.deque()
        recovery = _Recovery()
        while True:
            idle = not (batch.rows or batch.staged or recovery.suspects)
            closing = self._collect(waiting, block=idle, window=idle or len(batch.rows) < self.max_batch_size)
            if closing or self._stopping.is_set():
                _fail_rows(recovery.suspects, BackendUnavailableError("the local backend was closed"))
                self._fail(batch, waiting)
                return
            try:
                with self._torch.inference_mode():
                    if recovery.active:
                        self._readmit(batch, recovery)
                    else:
                        self._admit(batch, waiting)
                    if batch.rows:
                        try:
                            batch.step()
                        except Exception as exc:
                            self._step_failed(batch, recovery, exc)
                        else:
                            recovery.probation = None
                            self._stats.steps += 1
                            self._stats.row_steps += len(batch.rows)
                            self._finish_rows(batch)
            except Exception as exc:  # anything else fails the running rows, never the worker
                _fail_rows(batch.rows, BackendUnavailableError(f"local generation failed: {exc}"))
                batch.drop(set(range(len(batch.rows))))
            if not batch.rows:
                self._stats.cache_rows, self._stats.cache_bytes = 0, batch.cache_bytes()
            self._stats.peak_cache_bytes = max(self._stats.peak_cache_bytes, batch.peak_bytes)

    def _collect(self, waiting: collections.deque[_Item], *, block: bool, window: bool) -> bool:
        """Move queued requests to ``waiting``; True once close() was called.

        An idle worker blocks for the first request. Where there is room for them (``window``),
        whenever something arrives it waits up to ``batch_window`` for the rest of its round, so the
        round is prefilled (and shared) at once; a full batch does not wait for requests it cannot take.
        """
        window_end: float | None = None
        while True:
            try:
                if block and not waiting:
                    item = self._queue.get()
                elif window_end is not None:
                    item = self._queue.get(timeout=max(0.0, window_end - time.perf_counter()))
                else:
                    item = self._queue.get_nowait()
            except queue.Empty:
                return False
            if item is None:
                return True
            waiting.append(item)
            if window_end is None and window:
                window_end = time.perf_counter() + self.batch_window

    def _step_failed(self, batch: RunningBatch, recovery: _Recovery, error: Exception) -> None:
        """A decode step raised: fail the row that caused it, re-admit the others one by one."""
        rows = list(batch.rows)
        batch.drop(set(range(len(rows))))
        culprit = recovery.probation if recovery.probation in rows else (rows[0] if len(rows) == 1 else None)
        recovery.probation = None
        if culprit is not None:
            _fail_rows([culprit], BackendUnavailableError(f"local generation failed: {error}"))
        recovery.suspects.extend(row for row in (*rows, *batch.discard_staged()) if row is not culprit)

    def _readmit(self, batch: RunningBatch, recovery: _Recovery) -> None:
        """Let the next suspect back in: re-prefilled alone, on probation for its first step."""
        if recovery.probation is not None:
            return
        while recovery.suspects:
            row = recovery.suspects.popleft()
            if row.owner.cancelled:
                self._resolve(row, 0.0)
                continue
            cap, batch.max_padding = batch.max_padding, 1.0  # a suspect rejoins now, whatever its width
            try:
                self._count(batch.stage([row]))
                batch.join(1)
            except Exception as exc:
                batch.discard_staged()
                _fail_rows([row], BackendUnavailableError(f"local generation failed: {exc}"))
                continue
            finally:
                batch.max_padding = cap
            recovery.probation = row
            return

    def _admit(self, batch: RunningBatch, waiting: collections.deque[_Item]) -> None:
        """Fill free slots: prefill waiting requests (ahead of need, so several share a forward
        pass) and join staged rows to the running batch."""
        free = self.max_batch_size - len(batch.rows)
        if waiting and len(batch.staged) < free and batch.can_stage():
            ahead = self.max_batch_size // 2 if batch.can_join else 0
            self._stage(batch, waiting, free - len(batch.staged) + ahead)
        running = bool(batch.rows)
        try:
            joined = batch.join(free)
        except Exception as exc:  # out of memory merging: those rows fail, the running ones go on
            _fail_rows(batch.discard_staged(), BackendUnavailableError(f"local generation failed: {exc}"))
            return
        if joined and running:
            self._stats.joins += 1

    def _stage(self, batch: RunningBatch, waiting: collections.deque[_Item], count: int) -> None:
        rows: list[Row] = []
        while waiting and len(rows) < count:
            item = waiting.popleft()
            if not item.future.set_running_or_notify_cancel():
                continue  # cancelled while it waited: it never runs
            try:
                row = self._row(item)
            except BackendRequestError as exc:
                item.future.set_exception(exc)
                continue
            except Exception as exc:  # a prompt the tokenizer rejects fails that request only
                item.future.set_exception(BackendRequestError(f"messages: {exc}", 400))
                continue
            if item.request.max_tokens == 0:  # nothing to generate: no step is computed for it
                self._resolve(row, 0.0)
                continue
            rows.append(row)
        if not rows:
            return
        try:
            self._count(batch.stage(rows))
        except Exception as exc:
            if len(rows) == 1:
                _fail_rows(rows, BackendUnavailableError(f"local generation failed: {exc}"))
                return
            for row in rows:  # prefill them one by one: the request that fails, fails alone
                try:
                    self._count(batch.stage([row]))
                except Exception as alone:
                    _fail_rows([row], BackendUnavailableError(f"local generation failed: {alone}"))

    def _count(self, staged: Admission) -> None:
        self._stats.batches += 1
        self._stats.rows += staged.rows
        self._stats.prefill_tokens += staged.computed
        self._stats.prefill_tokens_saved += staged.saved

    def _row(self, item: _Item) -> Row:
        sampling = item.request.sampling
        prompt = self._prompt_ids(item.request)
        if not prompt:
            raise BackendRequestError("messages: the prompt renders to no tokens", 400)
        if not all(0 <= t < self._vocab for t in prompt):
            raise BackendRequestError(f"messages: the tokenizer gives ids outside the model's vocabulary "
                                      f"({self._vocab}); use the model's own tokenizer", 400)
        if self._context is not None and len(prompt) + item.request.max_tokens > self._context:
            raise BackendRequestError(
                f"max_tokens: the prompt's {len(prompt)} tokens plus max_tokens={item.request.max_tokens} exceed "
                f"the model's {self._context} positions; lower max_tokens or shorten the prompt", 400)
        generator = self._torch.Generator()
        # An unseeded request draws its seed from the OS, never from (or into) torch's global RNG.
        generator.manual_seed(sampling.seed if sampling.seed is not None else secrets.randbits(63))
        return Row(item, prompt, sampling.temperature, sampling.top_p, sampling.top_k, generator)

    def _finish_rows(self, batch: RunningBatch) -> None:
        """Drop finished rows, update the counters, then resolve their futures (in that order, so
        a caller woken by its result sees counters that already include it)."""
        finished = [(n, row) for n, row in enumerate(batch.rows) if self._done(row)]
        held_rows, held_bytes = batch.cache_rows(), batch.cache_bytes()  # what this step ran with
        if finished:
            batch.drop({n for n, _ in finished})
        self._stats.cache_rows, self._stats.cache_bytes = (
            (batch.cache_rows(), batch.cache_bytes()) if finished else (held_rows, held_bytes))
        self._stats.peak_rows = max(self._stats.peak_rows, held_rows)
        self._stats.peak_cache_bytes = max(self._stats.peak_cache_bytes, held_bytes)
        now = time.perf_counter()
        for _, row in finished:
            self._resolve(row, now - row.owner.enqueued)

    def _resolve(self, row: Row, latency: float) -> None:
        """Settle one finished row's future: its generation, or the error building it raised
        (which fails that request alone). An abandoned row's future is settled too."""
        future = row.owner.future
        if future.done():
            return
        if row.owner.cancelled:
            future.set_exception(BackendUnavailableError("the request was cancelled"))
            return
        try:
            generation = self._generation(row, latency, self._opens_think(row.prompt))
        except Exception as exc:
            future.set_exception(BackendUnavailableError(f"local generation failed building the result: {exc}"))
            return
        self._stats.kept_tokens += generation.completion_tokens
        future.set_result(generation)

    def _done(self, row: Row) -> bool:
        """Whether a row is finished: end of text, its token limit, a stop string, or cancelled."""
        request = row.owner.request
        if row.owner.cancelled or len(row.generated) >= request.max_tokens or row.generated[-1] in self._eos_set:
            return True
        if request.sampling.stop:
            try:
                with self._tok_lock:
                    text = self.tokenizer.decode(row.generated[-64:], skip_special_tokens=False)
            except Exception:  # the row ends here; building its result reports the error for it alone
                return True
            return any(stop in text for stop in request.sampling.stop)
        return False

    def _fail(self, batch: RunningBatch, waiting: collections.deque[_Item]) -> None:
        _fail_rows([*batch.rows, *batch.discard_staged()], BackendUnavailableError("the local backend was closed"))
        batch.drop(set(range(len(batch.rows))))
        self._fail_queued(list(waiting))

    def _fail_queued(self, items: list[_Item]) -> None:
        while True:
            try:
                nxt = self._queue.get_nowait()
            except queue.Empty:
                break
            if nxt is not None:
                items.append(nxt)
        for item in items:
            if item.future.set_running_or_notify_cancel():
                item.future.set_exception(BackendUnavailableError("the local backend was closed"))

    def _prompt_ids(self, request: GenerationRequest) -> list[int]:
        messages = [dict(m) for m in request.messages]
        with self._tok_lock:
            if getattr(self.tokenizer, "chat_template", None):
                ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
                if isinstance(ids, dict) or hasattr(ids, "keys"):
                    ids = ids["input_ids"]
                ids = list(ids)
            else:
                text = "\n\n".join(m["content"] for m in messages) + "\n\n"
                ids = list(self.tokenizer.encode(text))
            if request.assistant_prefix_ids is not None:
                ids += list(request.assistant_prefix_ids)
            elif request.assistant_prefix:
                ids += list(self.tokenizer.encode(request.assistant_prefix, add_special_tokens=False))
        return ids

    def _opens_think(self, prompt: list[int]) -> bool:
        """Whether the prompt ends inside a think block its chat template opened."""
        with self._tok_lock:
            tail = self.tokenizer.decode(prompt[-8:], skip_special_tokens=False)
        return tail.rstrip().endswith("<think>")

    def _generation(self, row: Row, latency: float, think_opened: bool) -> Generation:
        request = row.owner.request
        finish = "length"
        ids = row.generated[: request.max_tokens]
        for pos, token in enumerate(ids):
            if token in self._eos_set:
                ids, finish = ids[:pos], "stop"
                break
        with self._tok_lock:
            text = self.tokenizer.decode(ids, skip_special_tokens=False)
        for stop in request.sampling.stop:
            at = text.find(stop)
            if at >= 0:
                text, finish = text[:at], "stop"
                with self._tok_lock:
                    ids = list(self.tokenizer.encode(text, add_special_tokens=False))
        return Generation(
            text=text,
            finish_reason=finish,
            completion_tokens=len(ids),
            prompt_tokens=len(row.prompt),
            token_ids=tuple(ids),
            latency=latency,
            think_opened=think_opened,
        )
