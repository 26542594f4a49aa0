"""The local backend's running batch: rows join and leave between decode steps.

Real rounds are ragged (a reasoning trace stops anywhere between a few hundred tokens and β), so a
batch that runs until its longest row finishes spends most of its steps on padding, and requests
that arrive meanwhile wait for it to drain. Here the batch is a set of rows that share one KV cache:

* every row always holds one *pending* token that the next decode step feeds (a joining row's last
  prompt token, or a running row's last sampled token), so a decode step is one forward pass of
  shape ``[rows, 1]`` whatever each row's age;
* waiting requests are prefilled on their own (each distinct prompt once, then expanded to the
  rows that share it, which is how round 0's N identical prompts cost one prefill; prompts of very
  different lengths in separate forwards, so little padding is computed) and *staged*: when a slot
  frees, a staged row's cache is concatenated onto the running one, left-padded to the common
  width and masked. Prefilling up to ``max_batch_size // 2`` rows ahead of free slots lets rows
  that end one at a time be replaced without one small prefill each;
* a finished or cancelled row is removed from the cache with ``Cache.reorder_cache`` before the
  next step, and padding columns no remaining row needs are cut from the left, so the running
  cache holds exactly the rows still running (staged rows hold their prompt only).

Concatenating caches needs to know each layer's layout. Attention layers hold ``[B, H, S, D]``
keys/values; linear-attention layers (ZAYA's CCA conv and recurrent value state) hold per-row state
with no sequence axis. Caches of other layouts (sliding windows, static or quantised caches) still
drop rows, but only admit new rows when the batch is empty: correct, less busy.

Every row keeps its own position ids and its own seeded sampler; only the rounding of the batched
matmuls depends on the batch's shape (see the backend's docstring for what is deterministic).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Row:
    """One generation in flight: its prompt, its sampler and what it has produced so far."""

    owner: Any  #: the backend's handle for the request (its future and cancel flag)
    prompt: list[int]
    temperature: float
    top_p: float
    top_k: int | None
    generator: Any  #: a seeded ``torch.Generator``: the row's only source of randomness
    generated: list[int] = field(default_factory=list)
    #: Real tokens of this row in the cache; also the position id of its pending token.
    cached: int = 0
    pending: int = 0

    @property
    def context(self) -> list[int]:
        """Every token of the row so far: its prompt, then what it generated (the last one pending).
        A row re-prefilled after a failed step resumes from here."""
        return self.prompt + self.generated


@dataclass(frozen=True)
class Admission:
    """What one prefill computed and what sharing it across identical prompts saved."""

    rows: int
    computed: int
    saved: int


class RunningBatch:
    """The rows running on one model and their shared cache. Used from one thread only."""

    def __init__(self, model: Any, torch: Any, device: str, pad: int, prefix_sharing: bool,
                 max_padding: float = 0.5) -> None:
        self.model = model
        #: Largest share of the running cache's cells that may be padding after a join (a long row
        #: beside short ones pads every short row to its width); rows that would pass it wait.
        self.max_padding = max_padding
        #: Most cache bytes held at once: running and staged rows, and the copies a join makes.
        self.peak_bytes = 0
        self.torch = torch
        self.device = device
        self.pad = pad
        self.prefix_sharing = prefix_sharing
        self.rows: list[Row] = []
        self.cache: Any = None
        self.mask: Any = None  #: ``[rows, width]`` long: which cache columns hold real tokens
        #: Whether new rows may join a running batch (False: they wait until it is empty), known
        #: from the cache layout: guessed from the config, then checked on every prefill's cache.
        self.can_join: bool | None = None
        #: Rows prefilled and waiting for a slot, with their own cache (prompt tokens only).
        self.staged: list[Row] = []
        self._staged_cache: Any = None
        self._staged_mask: Any = None
        self._params: dict[str, Any] | None = None
        #: The keyword the model's forward takes its cache under (``cache`` from transformers 5.24;
        #: ``past_key_values`` in remote-code models written for earlier releases): a keyword a model
        #: does not know lands in its ``**kwargs`` and is ignored, which would run every step without context.
        self.cache_keyword = cache_keyword(model)

    # -- admission ----------------------------------------------------------------------------
    def can_stage(self) -> bool:
        """Whether waiting requests may be prefilled now: always where caches merge; otherwise only
        into an empty batch with nothing staged."""
        return bool(self.can_join) or not (self.rows or self.staged)

    def stage(self, rows: Sequence[Row]) -> Admission:
        """Prefill ``rows`` (all but each prompt's last token) and hold them until ``join``.

        Prefilling ahead of free slots lets several requests share one forward pass (a round's
        rows end one at a time), while joining still happens as soon as a slot frees.
        """
        torch = self.torch
        unique: dict[tuple[int, ...], int] = {}
        owners = []
        for n, row in enumerate(rows):
            context = row.context
            key = tuple(context[:-1]) if self.prefix_sharing else (n, *context[:-1])
            owners.append(unique.setdefault(key, len(unique)))
        prefixes = [list(key if self.prefix_sharing else key[1:]) for key in unique]
        if self.can_join is None:  # a guess from the config until a prefill shows the real cache
            self.can_join = _mergeable(_empty_cache(self.model))
        groups = _length_groups(prefixes) if self.can_join else [list(range(len(prefixes)))]
        cache, mask = self._prefill([prefixes[i] for i in groups[0]])
        if self.can_join and not _mergeable(cache):  # the model built another cache than its config says
            self.can_join = False
            if len(groups) > 1:
                groups = [list(range(len(prefixes)))]
                cache, mask = self._prefill(prefixes)
        for group in groups[1:]:
            more, more_mask = self._prefill([prefixes[i] for i in group])
            mask = _concat(torch, cache, mask, more, more_mask)
            del more
        order = [i for group in groups for i in group]
        if len(prefixes) < len(rows) or order != sorted(order):
            at = {u: n for n, u in enumerate(order)}
            index = torch.tensor([at[u] for u in owners], dtype=torch.long, device=self.device)
            cache.reorder_cache(index)
            mask = mask.index_select(0, index)
        for row in rows:
            row.cached = len(row.context) - 1
            row.pending = row.context[-1]
        if not self.staged:
            self._staged_cache, self._staged_mask = cache, mask
        else:
            self._staged_mask = _concat(torch, self._staged_cache, self._staged_mask, cache, mask)
        self.staged.extend(rows)
        computed = sum(len(p) for p in prefixes) + len(rows)
        return Admission(len(rows), computed, sum(len(r.context) for r in rows) - computed)

    def join(self, free: int) -> list[Row]:
        """Move up to ``free`` staged rows (oldest first) into the running batch; staged rows
        whose request was cancelled are dropped. Returns the rows that joined."""
        if not self.staged:
            return []
        torch = self.torch
        alive = [n for n, row in enumerate(self.staged) if not row.owner.cancelled]
        take = self._fitting(alive, free)
        rest = [n for n in alive if n not in take]
        if take:
            index = torch.tensor(take, dtype=torch.long, device=self.device)
            everything = len(take) == len(self.staged)
            if self.rows:
                before = self._bytes(self.cache) + self._bytes(self._staged_cache)
                self.mask = _concat(torch, self.cache, self.mask, self._staged_cache, self._staged_mask, index)
                # the old running tensors and the merged ones existed together for a moment
                self.peak_bytes = max(self.peak_bytes, before + self._bytes(self.cache))
            elif rest:  # the rest stay staged: the running batch gets a copy of its rows
                self.cache = _select(self._staged_cache, index)
                self.mask = _trim(torch, self.cache, self._staged_mask.index_select(0, index), True)
            else:  # the staged cache becomes the running one
                self.cache, self.mask = self._staged_cache, self._staged_mask
                if not everything:
                    self.cache.reorder_cache(index)
                    self.mask = _trim(torch, self.cache, self.mask.index_select(0, index), bool(self.can_join))
            self.rows.extend(self.staged[n] for n in take)
            self._params = None
        joined = [self.staged[n] for n in take]
        if not rest:
            self.staged, self._staged_cache, self._staged_mask = [], None, None
        elif len(rest) < len(self.staged):
            index = torch.tensor(rest, dtype=torch.long, device=self.device)
            self._staged_cache.reorder_cache(index)
            self._staged_mask = _trim(torch, self._staged_cache, self._staged_mask.index_select(0, index), True)
            self.staged = [self.staged[n] for n in rest]
        return joined

    def _fitting(self, alive: list[int], free: int) -> list[int]:
        """The staged rows (oldest first, at most ``free``) that may join without the running cache
        passing ``max_padding``. The first row that does not fit stops the rest, so a wide row is
        not overtaken forever: the batch drains until it fits (an empty batch takes any row)."""
        take: list[int] = []
        rows = len(self.rows)
        width = int(self.mask.shape[1]) if self.rows and self.mask is not None else 0
        real = sum(row.cached for row in self.rows)
        for n in alive[:free]:
            cached = self.staged[n].cached
            wider = max(width, cached)
            if rows and wider * (rows + 1) and 1 - (real + cached) / (wider * (rows + 1)) > self.max_padding:
                break
            take.append(n)
            rows, width, real = rows + 1, wider, real + cached
        return take

    def discard_staged(self) -> list[Row]:
        """Forget every staged row (their requests are failed by the caller); returns them."""
        rows, self.staged, self._staged_cache, self._staged_mask = self.staged, [], None, None
        return rows

    def _prefill(self, prefixes: list[list[int]]) -> tuple[Any, Any]:
        """One left-padded forward over ``prefixes``: its cache and its ``[rows, width]`` mask."""
        torch = self.torch
        width = max(1, max(len(p) for p in prefixes))
        ids = torch.full((len(prefixes), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(prefixes), width), dtype=torch.long)
        for r, prefix in enumerate(prefixes):
            if prefix:
                ids[r, width - len(prefix):] = torch.tensor(prefix, dtype=torch.long)
                mask[r, width - len(prefix):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp_(min=0)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                         logits_to_keep=1)
        return _returned_cache(out), mask

    # -- leaving ------------------------------------------------------------------------------
    def drop(self, leaving: set[int]) -> None:
        """Remove rows (by position) from the batch and the cache; free columns nobody needs."""
        keep = [n for n in range(len(self.rows)) if n not in leaving]
        self.rows = [self.rows[n] for n in keep]
        self._params = None
        if not keep:
            self.cache = self.mask = None
            return
        index = self.torch.tensor(keep, dtype=self.torch.long, device=self.device)
        self.cache.reorder_cache(index)
        self.mask = self.mask.index_select(0, index)
        self.mask = _trim(self.torch, self.cache, self.mask, bool(self.can_join))

    # -- decoding -----------------------------------------------------------------------------
    def step(self) -> list[int]:
        """Feed every row its pending token; sample each row's next token and make it pending."""
        torch = self.torch
        rows = self.rows
        ids = torch.tensor([[row.pending] for row in rows], dtype=torch.long, device=self.device)
        positions = torch.tensor([[row.cached] for row in rows], dtype=torch.long, device=self.device)
        self.mask = torch.cat([self.mask, self.mask.new_ones((len(rows), 1))], dim=1)
        out = self.model(input_ids=ids, attention_mask=self.mask, position_ids=positions, use_cache=True,
                         **{self.cache_keyword: self.cache})
        cache = _returned_cache(out)
        if self.can_join and _kv_width(cache) not in (None, self.mask.shape[1]):
            raise RuntimeError(f"the model ignored the cache passed as {self.cache_keyword}= (it returned "
                               f"{_kv_width(cache)} columns, not {self.mask.shape[1]})")
        self.cache = cache
        tokens = self._sample(out.logits[:, -1, :]).tolist()
        del out
        for row, token in zip(rows, tokens, strict=True):
            row.cached += 1
            row.pending = token
            row.generated.append(token)
        return tokens

    def cache_rows(self) -> int:
        """Rows held by the cache tensors themselves (not by the bookkeeping)."""
        if self.mask is None:
            return 0
        for layer in self.cache.layers:
            if _holds_kv(layer):
                return int(layer.keys.shape[0])
        return int(self.mask.shape[0])

    def cache_bytes(self) -> int:
        """Bytes of cache held now: the running rows' and the staged rows' (prefilled, waiting)."""
        held = self._bytes(self.cache) + self._bytes(self._staged_cache)
        self.peak_bytes = max(self.peak_bytes, held)
        return held

    @staticmethod
    def _bytes(cache: Any) -> int:
        if cache is None:
            return 0
        total = 0
        for layer in cache.layers:
            for name in ("keys", "values"):
                tensor = getattr(layer, name, None)
                if tensor is not None:
                    total += tensor.numel() * tensor.element_size()
            for states in ("conv_states", "recurrent_states"):
                for tensor in getattr(layer, states, {}).values():
                    if tensor is not None:
                        total += tensor.numel() * tensor.element_size()
        return total

    def _row_params(self, device: Any, vocab: int) -> dict[str, Any]:
        if self._params is None:
            torch = self.torch
            rows = self.rows
            self._params = {
                "temps": torch.tensor([max(r.temperature, 1e-6) for r in rows], device=device),
                "top_k": torch.tensor([r.top_k or vocab for r in rows], device=device),
                "top_p": torch.tensor([r.top_p for r in rows], device=device),
                "greedy": torch.tensor([r.temperature <= 0 for r in rows], device=device),
                "all_greedy": all(r.temperature <= 0 for r in rows),
                "position": torch.arange(vocab, device=device)[None, :],
            }
        return self._params

    def _sample(self, scores: Any) -> Any:
        """One sort per step for the whole batch; each row's generator only draws its uniform."""
        torch = self.torch
        logits = scores.float()
        vocab = logits.shape[1]
        p = self._row_params(logits.device, vocab)
        if p["all_greedy"]:
            return logits.argmax(dim=-1)
        sorted_logits, order = torch.sort(logits / p["temps"][:, None], dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        cumulative = torch.cumsum(probs, dim=-1)
        keep = (p["position"] < p["top_k"][:, None]) & ((cumulative - probs) <= p["top_p"][:, None])
        keep[:, 0] = True
        cdf = torch.cumsum(probs * keep, dim=-1)
        uniforms = torch.stack([torch.rand((), generator=r.generator) for r in self.rows]).to(logits.device)
        picked = torch.searchsorted(cdf, (uniforms * cdf[:, -1])[:, None]).clamp_(max=vocab - 1)
        return torch.where(p["greedy"], logits.argmax(dim=-1), order.gather(1, picked).squeeze(1))


def _concat(torch: Any, cache: Any, mask: Any, other: Any, other_mask: Any, rows: Any = None) -> Any:
    """Append ``other``'s rows (those at the ``rows`` index, or all) to ``cache`` in place,
    left-padding the narrower to the common width, and return the concatenated mask. Every new
    tensor is built before any is assigned, so a failure (out of memory) leaves ``cache`` as it was."""
    if rows is not None:
        other_mask = _trim(torch, None, other_mask.index_select(0, rows), True)

    def pick(tensor: Any) -> Any:
        tensor = tensor if rows is None else tensor.index_select(0, rows)
        return tensor[..., tensor.shape[-2] - other_mask.shape[1]:, :] if tensor.dim() > 3 else tensor

    width = max(mask.shape[1], other_mask.shape[1])
    ours, theirs = width - mask.shape[1], width - other_mask.shape[1]
    updates: list[tuple[Any, str, Any, Any]] = []  # (holder, attribute, or "" and a dict key, tensor)
    for mine, new in zip(cache.layers, other.layers, strict=True):
        if _holds_kv(mine):
            for name in ("keys", "values"):
                merged = torch.cat([_left_pad(torch, getattr(mine, name), ours),
                                    _left_pad(torch, pick(getattr(new, name)), theirs)])
                updates.append((mine, name, None, merged))
        for states in ("conv_states", "recurrent_states"):
            held, joining = getattr(mine, states, {}), getattr(new, states, {})
            for i, tensor in held.items():
                if tensor is not None:
                    updates.append((held, "", i, torch.cat([tensor, pick(joining[i])])))
    merged_mask = torch.cat([_left_pad(torch, mask, ours), _left_pad(torch, other_mask, theirs)])
    for holder, name, key, tensor in updates:
        if name:
            setattr(holder, name, tensor)
        else:
            holder[key] = tensor
    return merged_mask


def _length_groups(prefixes: list[list[int]], slack: float = 1.25, most: int = 16384) -> list[list[int]]:
    """Indices of ``prefixes`` grouped by length, one prefill per group.

    One left-padded forward over prompts of very different lengths computes mostly padding (a
    900-token prompt beside 100-token ones), so prompts are sorted by length and a group closes
    when its padding would pass ``slack`` times its real tokens (or 16 tokens a row, for short
    prompts), or when it would hold over ``most`` tokens, which bounds a prefill's activation
    memory (a longer single prompt is a group of its own).
    """
    order = sorted(range(len(prefixes)), key=lambda i: -len(prefixes[i]))
    groups: list[list[int]] = []
    real = 0
    for i in order:
        size = len(prefixes[i])
        if groups:
            rows, width = len(groups[-1]) + 1, len(prefixes[groups[-1][0]])
            if rows * width <= max(slack * (real + size), real + size + 16 * rows) and rows * width <= most:
                groups[-1].append(i)
                real += size
                continue
        groups.append([i])
        real = size
    return groups


def _trim(torch: Any, cache: Any, mask: Any, allowed: bool) -> Any:
    """Cut the left columns that no row needs (all padding) from ``mask`` and ``cache``."""
    if not allowed or mask.shape[1] <= 1:
        return mask
    used = mask.any(dim=0).nonzero()
    spare = int(used[0, 0]) if used.numel() else mask.shape[1] - 1
    if spare <= 0:
        return mask
    if cache is not None:
        for layer in cache.layers:
            if _holds_kv(layer):
                layer.keys = layer.keys[..., spare:, :]
                layer.values = layer.values[..., spare:, :]
    return mask[:, spare:]


def _select(cache: Any, index: Any) -> Any:
    """A new cache holding ``cache``'s rows at ``index`` (``cache`` itself is left as it was)."""
    chosen = copy.copy(cache)
    chosen.layers = []
    for layer in cache.layers:
        clone = copy.copy(layer)
        for attribute, value in vars(layer).items():  # no bookkeeping dict is shared between the two
            if isinstance(value, dict):
                setattr(clone, attribute, dict(value))
        for name in ("keys", "values"):
            tensor = getattr(layer, name, None)
            if tensor is not None and tensor.numel():
                setattr(clone, name, tensor.index_select(0, index))
        for states in ("conv_states", "recurrent_states"):
            held = getattr(layer, states, None)
            if held is not None:
                setattr(clone, states, {i: None if t is None else t.index_select(0, index) for i, t in held.items()})
        chosen.layers.append(clone)
    return chosen


def cache_keyword(model: Any) -> str:
    """The keyword ``model.forward`` takes its KV cache under, read from its signature."""
    import inspect

    params = inspect.signature(model.forward).parameters
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    raise TypeError(f"{type(model).__name__}.forward takes neither cache= nor past_key_values=")


def _returned_cache(out: Any) -> Any:
    """The cache a forward returned (``out.cache``, or ``out.past_key_values`` in remote-code models)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def _kv_width(cache: Any) -> int | None:
    """Columns held by the cache's first attention layer (None where no layer holds keys)."""
    for layer in cache.layers:
        if _holds_kv(layer):
            return int(layer.keys.shape[-2])
    return None


def _holds_kv(layer: Any) -> bool:
    """Whether a cache layer holds attention keys/values (``[B, H, S, D]``), not only per-row state."""
    return getattr(layer, "keys", None) is not None and bool(layer.keys.numel())


def _left_pad(torch: Any, tensor: Any, columns: int) -> Any:
    """Zero columns on the left of a ``[B, ..., S, D]`` cache tensor (or a ``[B, S]`` mask)."""
    if columns == 0:
        return tensor
    axis = tensor.dim() - 2 if tensor.dim() > 2 else 1
    shape = list(tensor.shape)
    shape[axis] = columns
    return torch.cat([tensor.new_zeros(shape), tensor], dim=axis)


def _empty_cache(model: Any) -> Any:
    from transformers.cache_utils import DynamicCache

    try:
        return DynamicCache(config=model.config)
    except Exception:  # a config the cache cannot read: no guess
        return None


def _mergeable(cache: Any) -> bool:
    """Whether every layer of ``cache`` has a layout ``_concat`` and the left trim understand."""
    from transformers.cache_utils import (
        DynamicCache,
        DynamicLayer,
        LinearAttentionAndFullAttentionLayer,
        LinearAttentionLayer,
    )

    known = (DynamicLayer, LinearAttentionLayer, LinearAttentionAndFullAttentionLayer)
    return type(cache) is DynamicCache and all(type(layer) in known for layer in cache.layers)
