"""TransformersBackend: any causal LM that transformers loads, batched, on ROCm, CUDA or CPU.

All model work runs on one worker thread. ``generate`` only enqueues; the worker takes every
request that is waiting (up to ``max_batch_size``) as one batch, so a whole round runs together
and requests arriving meanwhile form the next batch. Sampling is done per row with the row's own
seeded generator, so a request's tokens do not depend on which batch it lands in.

When every request of a batch has the same prompt (round 0 of a run), the prompt is prefilled
once and its cache expanded to the batch with ``Cache.reorder_cache`` and a zero index, which is
correct for recurrent/convolutional layers (ZAYA's CCA) as well as attention.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from markov_rsa.backends.base import BackendInfo, Generation, GenerationRequest
from markov_rsa.errors import BackendRequestError, BackendUnavailableError, MissingDependencyError

_INSTALL_HINT = "install the local backend with: pip install 'markov-rsa[local]'"


def _import_torch() -> Any:
    try:
        import torch
        import transformers  # noqa: F401
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        raise MissingDependencyError(f"the local backend needs torch and transformers; {_INSTALL_HINT}") from exc
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


@dataclass(frozen=True)
class BatchStats:
    """Counters for benchmarks: how work was batched and how much prefill sharing saved."""

    batches: int
    rows: int
    prefill_tokens: int
    prefill_tokens_saved: int


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
        trust_remote_code: bool = False,
        model_object: Any = None,
        tokenizer_object: Any = None,
        name: str | None = None,
    ) -> None:
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
        self._eos = self._eos_ids()
        self._pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self._eos[0]
        self._info = BackendInfo(
            kind="transformers",
            model=name or str(model or getattr(self.model.config, "_name_or_path", "model")),
            device=platform,
            tokenizer="exact",
            extra={"dtype": str(self.model.dtype).replace("torch.", ""), "model_type": self.model.config.model_type},
        )
        self.max_batch_size = max_batch_size
        self.prefix_sharing = prefix_sharing
        self.batch_window = batch_window
        self._tok_lock = threading.Lock()
        self._queue: queue.Queue[_Item | None] = queue.Queue()
        self._stats = [0, 0, 0, 0]
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
        return BatchStats(*self._stats)

    async def ready(self) -> None:
        return None

    async def generate(self, request: GenerationRequest) -> Generation:
        if request.tools:
            raise BackendRequestError("tools: the local backend does not run tool calls; serve through an "
                                      "OpenAI-compatible backend (--base-url) for agent requests", 400)
        if self._closed:
            raise BackendUnavailableError("the local backend was closed")
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
        self.close()

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
        while True:
            first = self._queue.get()
            if first is None or self._stopping.is_set():
                self._fail_queued(first)
                return
            batch = [first]
            deadline = time.perf_counter() + self.batch_window
            while len(batch) < self.max_batch_size:
                try:
                    nxt = self._queue.get(timeout=max(0.0, deadline - time.perf_counter()))
                except queue.Empty:
                    break
                if nxt is None:
                    self._queue.put(None)
                    break
                batch.append(nxt)
            live = [item for item in batch if item.future.set_running_or_notify_cancel()]
            if not live:
                continue
            try:
                outputs = self._run_batch(live)
            except Exception as exc:  # one bad batch must not kill the worker
                for item in live:
                    if not item.future.done():
                        item.future.set_exception(BackendUnavailableError(f"local generation failed: {exc}"))
                continue
            finally:
                gc.collect()
                if self._device != "cpu":
                    self._torch.cuda.empty_cache()
            for item, out in zip(live, outputs, strict=True):
                if item.future.done():
                    continue
                if self._stopping.is_set():  # cut short by close(): not a real truncation
                    item.future.set_exception(BackendUnavailableError("the local backend was closed"))
                else:
                    item.future.set_result(out)

    def _fail_queued(self, first: _Item | None) -> None:
        items = [first] if first is not None else []
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

    def _run_batch(self, items: list[_Item]) -> list[Generation]:
        torch = self._torch
        from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList

        prompts = [self._prompt_ids(item.request) for item in items]
        rows = len(items)
        max_new = max(item.request.max_tokens for item in items)
        shared = self.prefix_sharing and rows > 1 and all(p == prompts[0] for p in prompts)
        width = max(len(p) for p in prompts)
        input_ids = torch.full((rows, width), self._pad, dtype=torch.long)
        attention = torch.zeros((rows, width), dtype=torch.long)
        for r, p in enumerate(prompts):
            input_ids[r, width - len(p):] = torch.tensor(p, dtype=torch.long)
            attention[r, width - len(p):] = 1
        input_ids, attention = input_ids.to(self._device), attention.to(self._device)
        state = _RowState(items, width, self._eos, self.tokenizer, self._tok_lock, torch, self._stopping)
        config = GenerationConfig(
            max_new_tokens=max_new,
            do_sample=False,
            pad_token_id=self._pad,
            eos_token_id=self._eos,
            use_cache=True,
        )
        kwargs: dict[str, Any] = {}
        prefill = sum(len(p) for p in prompts)
        saved = 0
        with torch.inference_mode():
            if shared and width > 1:
                prefix = input_ids[:1, :-1]
                prefilled = self.model(input_ids=prefix, use_cache=True)
                cache = getattr(prefilled, "cache", None) or prefilled.past_key_values
                cache.reorder_cache(torch.zeros(rows, dtype=torch.long, device=self._device))
                kwargs["cache"] = cache
                del prefilled
                saved = (rows - 1) * (width - 1)
            out = self.model.generate(
                input_ids=input_ids,
                attention_mask=attention,
                generation_config=config,
                logits_processor=LogitsProcessorList([state.sampler]),
                stopping_criteria=StoppingCriteriaList([state.stopper]),
                **kwargs,
            )
        self._stats[0] += 1
        self._stats[1] += rows
        self._stats[2] += prefill - saved
        self._stats[3] += saved
        now = time.perf_counter()
        results = []
        for r, item in enumerate(items):
            generated = out[r, width:].tolist()
            results.append(state.finish(r, generated, len(prompts[r]), now - item.enqueued,
                                        think_opened=self._opens_think(prompts[r])))
        del out, kwargs
        return results


class _RowState:
    """Per-row sampling and stopping for one batch, run inside ``model.generate``.

    Sampling happens here, with each row's own seeded generator, and the chosen token is forced
    through greedy decoding; generate itself therefore never draws from the global RNG.
    """

    def __init__(self, items: list[_Item], width: int, eos: list[int], tokenizer: Any, lock: Any, torch: Any,
                 stopping: threading.Event):
        self.items = items
        self.stopping = stopping
        self.width = width
        self.eos = set(eos)
        self.tokenizer = tokenizer
        self.lock = lock
        self.torch = torch
        self.generators = []
        for item in items:
            g = torch.Generator()
            g.manual_seed(item.request.sampling.seed if item.request.sampling.seed is not None else torch.seed())
            self.generators.append(g)
        self.params: dict[str, Any] = {}  # per-row sampling tensors, built on the first step's device
        self.sampler = self._sample
        self.stopper = _Stopper(self)

    def _row_params(self, device: Any, vocab: int) -> dict[str, Any]:
        if not self.params:
            torch = self.torch
            params = [item.request.sampling for item in self.items]
            self.params = {
                "temps": torch.tensor([max(p.temperature, 1e-6) for p in params], device=device),
                "top_k": torch.tensor([p.top_k or vocab for p in params], device=device),
                "top_p": torch.tensor([p.top_p for p in params], device=device),
                "greedy": torch.tensor([p.temperature <= 0 for p in params], device=device),
                "position": torch.arange(vocab, device=device)[None, :],
                "rows": torch.arange(len(params), device=device),
            }
        return self.params

    def _sample(self, input_ids: Any, scores: Any) -> Any:
        """One sort per step for the whole batch; each row's generator only draws its uniform."""
        torch = self.torch
        logits = scores.float()
        vocab = logits.shape[1]
        p = self._row_params(logits.device, vocab)
        sorted_logits, order = torch.sort(logits / p["temps"][:, None], dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        cumulative = torch.cumsum(probs, dim=-1)
        keep = (p["position"] < p["top_k"][:, None]) & ((cumulative - probs) <= p["top_p"][:, None])
        keep[:, 0] = True
        cdf = torch.cumsum(probs * keep, dim=-1)
        uniforms = torch.stack([torch.rand((), generator=g) for g in self.generators]).to(logits.device)
        picked = torch.searchsorted(cdf, (uniforms * cdf[:, -1])[:, None]).clamp_(max=vocab - 1)
        tokens = torch.where(p["greedy"], order[:, 0], order.gather(1, picked).squeeze(1))
        forced = torch.full_like(scores, float("-inf"))
        forced[p["rows"], tokens] = 0.0
        return forced

    def done(self, r: int, count: int, last: int | None, recent: Callable[[], list[int]]) -> bool:
        """Whether row ``r`` is finished after ``count`` generated tokens, the last one ``last``.

        ``recent`` gives the last few generated ids; it is called only for rows with stop strings,
        so a step never copies whole sequences out of the tensor.
        """
        item = self.items[r]
        if item.cancelled or self.stopping.is_set() or count >= item.request.max_tokens:
            return True
        if last is not None and last in self.eos:
            return True
        stops = item.request.sampling.stop
        if stops:
            with self.lock:
                text = self.tokenizer.decode(recent(), skip_special_tokens=False)
            if any(stop in text for stop in stops):
                return True
        return False

    def finish(self, r: int, generated: list[int], prompt_tokens: int, latency: float,
               think_opened: bool = False) -> Generation:
        request = self.items[r].request
        finish = "length"
        cut = min(len(generated), request.max_tokens)
        for pos, token in enumerate(generated[:cut]):
            if token in self.eos:
                cut, finish = pos, "stop"
                break
        ids = generated[:cut]
        with self.lock:
            text = self.tokenizer.decode(ids, skip_special_tokens=False)
        for stop in request.sampling.stop:
            at = text.find(stop)
            if at >= 0:
                text, finish = text[:at], "stop"
                with self.lock:
                    ids = list(self.tokenizer.encode(text, add_special_tokens=False))
        return Generation(
            text=text,
            finish_reason=finish,
            completion_tokens=len(ids),
            prompt_tokens=prompt_tokens,
            token_ids=tuple(ids),
            latency=latency,
            think_opened=think_opened,
        )


class _Stopper:
    def __init__(self, state: _RowState) -> None:
        self.state = state

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        torch = self.state.torch
        width = self.state.width
        count = input_ids.shape[1] - width
        lasts = input_ids[:, -1].tolist() if count > 0 else [None] * input_ids.shape[0]
        start = max(width, input_ids.shape[1] - 64)

        def recent(r: int) -> Callable[[], list[int]]:
            return lambda: list(input_ids[r, start:].tolist())

        flags = [self.state.done(r, count, lasts[r], recent(r)) for r in range(input_ids.shape[0])]
        return torch.tensor(flags, dtype=torch.bool, device=input_ids.device)

