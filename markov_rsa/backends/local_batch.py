"""The local backend's running batch: rows join and leave between decode steps.

Real rounds are ragged (a reasoning trace stops anywhere between a few hundred tokens and β), so a
batch that runs until its longest row finishes spends most of its steps on padding, and requests
that arrive meanwhile wait for it to drain. Here the batch is a set of rows that share one KV cache:

* every row always holds one *pending* token that the next decode step feeds (a joining row's last
  prompt token, or a running row's last sampled token), so a decode step is one forward pass of
  shape ``[rows, 1]`` whatever each row's age;
* joining rows are prefilled on their own (each distinct prompt once, then expanded to the rows
  that share it, which is how round 0's N identical prompts cost one prefill), and their cache is
  concatenated onto the running one, left-padded to the common width and masked;
* a finished or cancelled row is removed from the cache with ``Cache.reorder_cache`` before the
  next step, and padding columns no remaining row needs are cut from the left, so the cache holds
  exactly the rows still running.

Concatenating caches needs to know each layer's layout. Attention layers hold ``[B, H, S, D]``
keys/values; linear-attention layers (ZAYA's CCA conv and recurrent value state) hold per-row state
with no sequence axis. Caches of other layouts (sliding windows, static or quantised caches) still
drop rows, but only admit new rows when the batch is empty: correct, less busy.

Every row keeps its own position ids and its own seeded sampler, so its tokens do not depend on
when it joined or which rows it shared steps with.
"""

from __future__ import annotations

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


@dataclass(frozen=True)
class Admission:
    """What one prefill computed and what sharing it across identical prompts saved."""

    rows: int
    computed: int
    saved: int


class RunningBatch:
    """The rows running on one model and their shared cache. Used from one thread only."""

    def __init__(self, model: Any, torch: Any, device: str, pad: int, prefix_sharing: bool) -> None:
        self.model = model
        self.torch = torch
        self.device = device
        self.pad = pad
        self.prefix_sharing = prefix_sharing
        self.rows: list[Row] = []
        self.cache: Any = None
        self.mask: Any = None  #: ``[rows, width]`` long: which cache columns hold real tokens
        #: None until the first prefill shows the cache layout; then whether new rows may join
        #: a running batch (False: they wait until it is empty).
        self.can_join: bool | None = None
        self._params: dict[str, Any] | None = None

    # -- admission ----------------------------------------------------------------------------
    def accepts_joins(self) -> bool:
        return not self.rows or self.can_join is not False

    def admit(self, rows: Sequence[Row]) -> Admission:
        """Prefill ``rows`` (all but each prompt's last token) and add them to the batch."""
        torch = self.torch
        unique: dict[tuple[int, ...], int] = {}
        owners = []
        for n, row in enumerate(rows):
            key = tuple(row.prompt[:-1]) if self.prefix_sharing else (n, *row.prompt[:-1])
            owners.append(unique.setdefault(key, len(unique)))
        prefixes = [list(key if self.prefix_sharing else key[1:]) for key in unique]
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
        cache = getattr(out, "cache", None) or out.past_key_values
        del out
        if len(prefixes) < len(rows):
            index = torch.tensor(owners, dtype=torch.long, device=self.device)
            cache.reorder_cache(index)
            mask = mask.index_select(0, index)
        if self.can_join is None:
            self.can_join = _mergeable(cache)
        for row in rows:
            row.cached = len(row.prompt) - 1
            row.pending = row.prompt[-1]
        if not self.rows:
            self.cache, self.mask = cache, mask
        else:
            self._merge(cache, mask)
        self.rows.extend(rows)
        self._params = None
        computed = sum(len(p) for p in prefixes) + len(rows)
        return Admission(len(rows), computed, sum(len(r.prompt) for r in rows) - computed)

    def _merge(self, cache: Any, mask: Any) -> None:
        """Concatenate a prefilled cache onto the running one. Every new tensor is built before any
        is assigned, so a failure (out of memory) leaves the running batch as it was."""
        torch = self.torch
        width = max(self.mask.shape[1], mask.shape[1])
        ours, theirs = width - self.mask.shape[1], width - mask.shape[1]
        updates: list[tuple[Any, str, Any, Any]] = []  # (holder, attribute, or "" and a dict key, tensor)
        for mine, new in zip(self.cache.layers, cache.layers, strict=True):
            if getattr(mine, "keys", None) is not None and mine.keys.numel():
                for name in ("keys", "values"):
                    merged = torch.cat([_left_pad(torch, getattr(mine, name), ours),
                                        _left_pad(torch, getattr(new, name), theirs)])
                    updates.append((mine, name, None, merged))
            for states in ("conv_states", "recurrent_states"):
                held, joining = getattr(mine, states, {}), getattr(new, states, {})
                for i, tensor in held.items():
                    if tensor is not None:
                        updates.append((held, "", i, torch.cat([tensor, joining[i]])))
        merged_mask = torch.cat([_left_pad(torch, self.mask, ours), _left_pad(torch, mask, theirs)])
        for holder, name, key, tensor in updates:
            if name:
                setattr(holder, name, tensor)
            else:
                holder[key] = tensor
        self.mask = merged_mask

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
        spare = self.mask.shape[1] - max(row.cached for row in self.rows)
        if spare > 0 and self.can_join:
            for layer in self.cache.layers:
                if getattr(layer, "keys", None) is not None and layer.keys.numel():
                    layer.keys = layer.keys[..., spare:, :]
                    layer.values = layer.values[..., spare:, :]
            self.mask = self.mask[:, spare:]

    # -- decoding -----------------------------------------------------------------------------
    def step(self) -> list[int]:
        """Feed every row its pending token; sample each row's next token and make it pending."""
        torch = self.torch
        rows = self.rows
        ids = torch.tensor([[row.pending] for row in rows], dtype=torch.long, device=self.device)
        positions = torch.tensor([[row.cached] for row in rows], dtype=torch.long, device=self.device)
        self.mask = torch.cat([self.mask, self.mask.new_ones((len(rows), 1))], dim=1)
        out = self.model(input_ids=ids, attention_mask=self.mask, position_ids=positions, cache=self.cache,
                         use_cache=True)
        self.cache = getattr(out, "cache", None) or out.past_key_values
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
            if getattr(layer, "keys", None) is not None and layer.keys.numel():
                return int(layer.keys.shape[0])
        return int(self.mask.shape[0])

    def cache_bytes(self) -> int:
        if self.cache is None:
            return 0
        total = 0
        for layer in self.cache.layers:
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


def _left_pad(torch: Any, tensor: Any, columns: int) -> Any:
    """Zero columns on the left of a ``[B, ..., S, D]`` cache tensor (or a ``[B, S]`` mask)."""
    if columns == 0:
        return tensor
    axis = tensor.dim() - 2 if tensor.dim() > 2 else 1
    shape = list(tensor.shape)
    shape[axis] = columns
    return torch.cat([tensor.new_zeros(shape), tensor], dim=axis)


def _mergeable(cache: Any) -> bool:
    """Whether every layer of ``cache`` has a layout ``_merge`` and the left trim understand."""
    from transformers.cache_utils import (
        DynamicCache,
        DynamicLayer,
        LinearAttentionAndFullAttentionLayer,
        LinearAttentionLayer,
    )

    known = (DynamicLayer, LinearAttentionLayer, LinearAttentionAndFullAttentionLayer)
    return type(cache) is DynamicCache and all(type(layer) in known for layer in cache.layers)
