"""``make bench-gpu``: the local backend at ZAYA1-8B's shapes on one GPU, in under 8 minutes.

The model has the published ZAYA1-8B configuration (``ZayaConfig()``'s defaults: 40 layers of CCA
attention and 16-expert MoE, hidden 2048, vocabulary 262,272) with random bf16 weights, so the
figures measure compute and memory, not answers. Where the GPU cannot hold every layer, fewer
are built and the output says so. It runs from a checkout alone (no Hub, no file outside the
repository). Measured, each in this one process:

0. greedy tokens batched against alone, checked before any timing;
1. decode steps/s for N = 1, 4, 16, 64 (warmed up, min and median of repeats) next to the
   memory-bandwidth bound for the active weights, and the aten ops one step dispatches;
2. one row's decode steps/s after prompts of 1K, 4K and 16K tokens;
3. tokens/s for N = 1, 4, 16, 64 rows batched against one request at a time;
4. ragged rows (lengths over 10-100% of β) against equal-length rows of the same total, N=16;
5. prefix sharing: one round-0 prefill of a long prompt for 16 rows, shared against not;
6. peak memory against T for Markovian RSA (τ < β) and full-chain RSA (τ = β), and against the
   number of chunks of one chunked rollout versus one generation of the same length.

Memory is reported twice: the backend's peak KV-cache bytes (read from the cache tensors, the same
on any device) and, on a GPU, the allocator's peak above the weights. The tokenizer only renders
prompts: by default a byte-level one built in (one id per byte, so a prompt of L characters is L
tokens; pass ``--tokenizer DIR`` for another); ids it cannot decode are masked out of sampling
with an output bias so that tails carry whole tokens.

``--tiny`` runs the same script on a two-layer model in seconds (the test suite's smoke test). Each
section is written to ``results.json``/``results.md`` as it finishes, and a section that would
outrun ``--budget`` seconds is skipped and named, so a run that is cut short still reports.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.ragged import ragged_lengths  # noqa: E402
from bench.tables import md_table  # noqa: E402
from markov_rsa import GenerationRequest, MarkovianRSA, RSAConfig, SamplingParams  # noqa: E402
from markov_rsa.backends.transformers import TransformersBackend, select_device  # noqa: E402

SAMPLED = SamplingParams(temperature=1.0, top_p=0.95)
GREEDY = SamplingParams(temperature=0)


class ByteTokenizer:
    """A tokenizer that needs no file: one id per UTF-8 byte, then end-of-text and padding.

    The GPU machine is offline and the model's own tokenizer is not in the repository; prompts
    only need exact ids (a prompt of L characters is L tokens), and the model's other ids are
    masked out of sampling so every sampled token decodes.
    """

    chat_template = None
    eos_token_id = 256
    pad_token_id = 257
    bos_token_id = None

    def __len__(self) -> int:
        return 258

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Any, skip_special_tokens: bool = False) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


#: Sizes of the full run and of ``--tiny``.
FULL = {"new": 128, "sizes": (1, 4, 16, 64), "contexts": (1024, 4096, 16384), "repeats": 3,
        "beta": 192, "tau": 24, "rounds": (1, 3), "chunk": 128,
        "carry": 32, "chunks": (1, 2, 4), "prompt_words": 1500}
TINY = {"new": 8, "sizes": (1, 4, 16), "contexts": (64, 256), "repeats": 2,
        "beta": 16, "tau": 4, "rounds": (1, 2), "chunk": 8, "carry": 2,
        "chunks": (1, 2), "prompt_words": 60}


def build_model(torch: Any, device: str, tokenizer: Any, *, tiny: bool, layers: int | None) -> tuple[Any, str]:
    """A random ZAYA1-8B-shaped model (or a tiny one) on ``device``; the note says what was built."""
    from transformers import ZayaConfig, ZayaForCausalLM

    shapes: dict[str, Any] = {}
    if tiny:
        shapes = {"vocab_size": len(tokenizer), "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                  "num_key_value_heads": 2, "head_dim": 16, "moe_intermediate_size": 64, "num_experts": 4,
                  "router_hidden_size": 16}
    full_layers = shapes.get("num_hidden_layers", ZayaConfig().num_hidden_layers)
    if layers is None and device.startswith("cuda") and not tiny:
        free, _ = torch.cuda.mem_get_info()
        per_layer = 2 * 220e6  # bf16 bytes of one layer: 16 experts x 3 x 2048 x 2048, plus attention
        layers = min(full_layers, int((free * 0.6 - 2 * 540e6) / per_layer))
    layers = min(full_layers, layers or full_layers)
    vocab = shapes.get("vocab_size", ZayaConfig().vocab_size)
    masked = vocab > len(tokenizer)
    config = ZayaConfig(**{**shapes, "num_hidden_layers": layers}, lm_head_bias=masked,
                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = ZayaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(previous)
    if masked:  # ids the tokenizer cannot decode are never sampled
        with torch.no_grad():
            model.lm_head.bias.zero_()
            model.lm_head.bias[len(tokenizer):] = -1e4
            model.lm_head.bias[tokenizer.eos_token_id] = -1e4  # rows run to max_tokens: steps are comparable
    params = sum(p.numel() for p in model.parameters())
    note = (f"{'tiny ZAYA' if tiny else 'ZAYA1-8B shapes'}: {layers} of {full_layers} layers, "
            f"{params / 1e9:.2f}B parameters, {str(dtype).replace('torch.', '')}, random weights")
    if masked:
        note += f"; ids beyond the tokenizer's {len(tokenizer):,} masked out of {vocab:,}"
    return model, note


def active_weight_bytes(model: Any) -> int:
    """Bytes of the weights one decode step reads: every parameter, less the experts a token does
    not route to (top-k of E per MoE layer)."""
    config = model.config
    experts, top = getattr(config, "num_experts", 0) or 0, getattr(config, "num_experts_per_tok", 0) or 0
    total = 0.0
    for name, param in model.named_parameters():
        size = param.numel() * param.element_size()
        if experts and top and "experts" in name and "router" not in name:
            size *= top / experts
        total += size
    return int(total)


class Bench:
    def __init__(self, model: Any, tokenizer: Any, device: str, sizes: dict[str, Any], out: Path, budget: float,
                 note: str) -> None:
        import torch

        self.torch, self.model, self.tokenizer, self.device = torch, model, tokenizer, device
        self.sizes, self.out, self.budget = sizes, out, budget
        self.started = time.perf_counter()
        self.results: dict[str, Any] = {"model": note, "device": device, "skipped": []}
        if device.startswith("cuda"):
            self.results["gpu"] = torch.cuda.get_device_name()

    def backend(self, **kwargs: Any) -> TransformersBackend:
        return TransformersBackend(model_object=self.model, tokenizer_object=self.tokenizer, device=self.device,
                                   **kwargs)

    def left(self) -> float:
        return self.budget - (time.perf_counter() - self.started)

    def request(self, n: int, seed: int, words: int = 12) -> GenerationRequest:
        text = " ".join(["Consider the sequence of odd numbers and their sums."] * max(1, words // 9))
        return GenerationRequest(({"role": "user", "content": text},), n, dataclasses.replace(SAMPLED, seed=seed))

    def section(self, name: str, run: Any) -> None:
        print(f"[bench-gpu] {name} ({self.left():.0f} s left)", file=sys.stderr, flush=True)
        if self.left() <= 0:
            self.results["skipped"].append(name)
        else:
            self.results[name] = run()
            if self.left() < 0:
                self.results["skipped"].append(f"the rest of {name}")
        self.write()

    # -- measurements -------------------------------------------------------------------------
    def check(self) -> dict[str, Any]:
        """Greedy tokens batched against alone, before any timing: a batch that changed a row's
        tokens would make every figure after it meaningless (bf16 may flip near-ties: counted)."""
        backend = self.backend(max_batch_size=8)
        prompts = [f"Problem {i}: " + "sum the odd numbers. " * (1 + 3 * i) for i in range(4)]
        requests = [GenerationRequest(({"role": "user", "content": p},), 16, GREEDY) for p in prompts]

        async def run() -> tuple[list[Any], list[Any]]:
            alone = [(await backend.generate(r)).token_ids for r in requests]
            together = [g.token_ids for g in await asyncio.gather(*(backend.generate(r) for r in requests))]
            return alone, together

        try:
            alone, together = asyncio.run(run())
        finally:
            backend.close()
        same = sum(a == t for a, t in zip(alone, together, strict=True))
        print(f"[bench-gpu] greedy batched == alone: {same}/{len(alone)} rows", file=sys.stderr, flush=True)
        return {"equal": same, "rows": len(alone)}

    def decode(self) -> dict[str, Any]:
        """Decode steps/s per batch size (warmed up; min and median of repeats) next to the
        memory-bandwidth bound: measured copy bandwidth over the bytes of the active weights."""
        repeats, new = self.sizes["repeats"], max(4, self.sizes["new"] // 2)
        rows = []
        for n in self.sizes["sizes"]:
            if self.left() < 0:
                break
            backend = self.backend(max_batch_size=n)

            async def rate(backend: TransformersBackend = backend, n: int = n, tokens: int = new) -> float:
                requests = [GenerationRequest(({"role": "user", "content": f"Row {i}."},), tokens,
                                              GREEDY) for i in range(n)]
                before = backend.stats.steps
                self.sync()
                start = time.perf_counter()
                await asyncio.gather(*(backend.generate(r) for r in requests))
                self.sync()
                return (backend.stats.steps - before) / (time.perf_counter() - start)

            try:
                asyncio.run(rate(tokens=4))  # warm-up
                rates = sorted(asyncio.run(rate()) for _ in range(repeats))
            finally:
                backend.close()
            rows.append([n, round(rates[0], 1), round(rates[len(rates) // 2], 1), round(rates[len(rates) // 2] * n, 1)])
        bandwidth = self.bandwidth()
        active = active_weight_bytes(self.model)
        bound = bandwidth / active if active else None
        return {"rows": rows, "bandwidth_gbs": round(bandwidth / 1e9, 1),
                "active_weight_mb": round(active / 1e6, 3),
                "bound_steps_s": None if bound is None else round(bound, 1), "ops_per_step": self.ops_per_step(),
                "repeats": repeats}

    def context(self) -> dict[str, Any]:
        """Decode steps/s of one row after prompts of growing length (where the Markovian bound on
        the prompt matters), min and median of repeats."""
        rows = []
        backend = self.backend(max_batch_size=1)
        try:
            for length in self.sizes["contexts"]:
                if self.left() < 0:
                    break
                text = "abcdefgh" * (length // 8)

                async def once(text: str = text) -> float:
                    request = GenerationRequest(({"role": "user", "content": text},), self.sizes["new"] // 4 + 2,
                                                GREEDY)
                    before = backend.stats.steps
                    self.sync()
                    start = time.perf_counter()
                    await backend.generate(request)
                    self.sync()
                    return (backend.stats.steps - before) / (time.perf_counter() - start)

                rates = sorted(asyncio.run(once()) for _ in range(self.sizes["repeats"]))
                rows.append([length, round(rates[0], 1), round(rates[len(rates) // 2], 1)])
        finally:
            backend.close()
        return {"rows": rows}

    def sync(self) -> None:
        if self.device.startswith("cuda"):
            self.torch.cuda.synchronize()

    def bandwidth(self) -> float:
        """Bytes/s of a device-to-device copy (read + write), best of three."""
        torch = self.torch
        size = 2**30 if self.device.startswith("cuda") else 32 * 2**20
        src = torch.empty(size, dtype=torch.uint8, device=self.device)
        dst = torch.empty_like(src)
        best = 0.0
        for _ in range(6):
            self.sync()
            start = time.perf_counter()
            dst.copy_(src)
            self.sync()
            best = max(best, 2 * size / (time.perf_counter() - start))
        return best

    def ops_per_step(self) -> int:
        """aten ops dispatched by one single-token forward: eager code launches one kernel or more each."""
        from torch.utils._python_dispatch import TorchDispatchMode

        class Count(TorchDispatchMode):
            ops = 0

            def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
                Count.ops += 1
                return func(*args, **(kwargs or {}))

        ids = self.torch.tensor([[1]], device=self.device)
        with self.torch.inference_mode(), Count():
            self.model(input_ids=ids, use_cache=True)
        return Count.ops

    def throughput(self) -> dict[str, Any]:
        backend = self.backend(max_batch_size=max(self.sizes["sizes"]))
        new = self.sizes["new"]

        async def rate(requests: list[GenerationRequest], together: bool) -> float:
            start = time.perf_counter()
            if together:
                gens = await asyncio.gather(*(backend.generate(r) for r in requests))
            else:
                gens = [await backend.generate(r) for r in requests]
            return sum(g.completion_tokens for g in gens) / (time.perf_counter() - start)

        async def run() -> dict[str, Any]:
            await rate([self.request(4, 0)], True)  # warm-up
            alone = await rate([self.request(new, 1), self.request(new, 2)], False)
            rows = []
            for n in self.sizes["sizes"]:
                if self.left() < 0:
                    break
                batched = await rate([self.request(new, 10 + i) for i in range(n)], True)
                rows.append([n, round(batched, 1), round(alone, 1), round(batched / alone, 1)])
            return {"new_tokens": new, "rows": rows}

        try:
            return asyncio.run(run())
        finally:
            backend.close()

    def ragged(self) -> dict[str, Any]:
        backend = self.backend(max_batch_size=16)
        lengths = ragged_lengths(16, self.sizes["beta"])
        equal = [round(sum(lengths) / 16)] * 16

        async def rate(ns: list[int]) -> tuple[float, float]:
            before = backend.stats
            start = time.perf_counter()
            gens = await asyncio.gather(*(backend.generate(self.request(n, 100 + i)) for i, n in enumerate(ns)))
            after = backend.stats
            kept = (after.kept_tokens - before.kept_tokens) / max(1, after.row_steps - before.row_steps)
            return sum(g.completion_tokens for g in gens) / (time.perf_counter() - start), kept

        async def run() -> dict[str, Any]:
            rows = []
            for label, copies in (("4 rounds in flight", 4), ("one round alone", 1)):
                if self.left() < 0:
                    break
                (r, kept), (e, _) = await rate(lengths * copies), await rate(equal * copies)
                rows.append([label, round(r, 1), round(e, 1), round(r / e, 2), round(kept, 3)])
            return {"beta": self.sizes["beta"], "rows": rows}

        try:
            return asyncio.run(run())
        finally:
            backend.close()

    def prefix(self) -> dict[str, Any]:
        rows = []
        for share in (True, False):
            backend = self.backend(max_batch_size=16, prefix_sharing=share)

            async def run(backend: TransformersBackend = backend) -> float:
                prompt = self.request(4, 0, self.sizes["prompt_words"])
                start = time.perf_counter()
                await asyncio.gather(*(backend.generate(prompt) for _ in range(16)))
                return time.perf_counter() - start

            with self.peak() as peak:
                wall = asyncio.run(run())
            stats = backend.stats
            backend.close()
            rows.append(["shared" if share else "not shared", stats.prefill_tokens, stats.prefill_tokens_saved,
                         round(wall, 2), peak["gpu_mib"]])
        return {"rows": rows}

    def memory(self) -> dict[str, Any]:
        s = self.sizes
        base = {"population": 4, "k": 2, "budget": s["beta"], "seed": 0, "temperature": 1.0, "top_p": 0.95}
        rounds = []
        for t in s["rounds"]:
            if self.left() < 0:
                break
            rounds.append([t, *self.run_peak(RSAConfig(**base, rounds=t, tail=s["tau"])),
                           *self.run_peak(RSAConfig(**base, rounds=t, tail=s["beta"]))])
        chunks = []
        one = {"population": 1, "k": 1, "rounds": 0, "tail": s["tau"], "seed": 0, "temperature": 1.0}
        for c in s["chunks"]:
            if self.left() < 0:
                break
            total = s["chunk"] * c
            chunks.append([c, total, *self.run_peak(RSAConfig(**one, budget=total, chunk_size=s["chunk"],
                                                              carryover=s["carry"], max_chunks=c)),
                           *self.run_peak(RSAConfig(**one, budget=total))])
        return {"beta": s["beta"], "tau": s["tau"], "chunk": s["chunk"], "carry": s["carry"], "rounds": rounds,
                "chunks": chunks}

    def run_peak(self, cfg: RSAConfig) -> list[Any]:
        """[peak KV-cache MiB, peak GPU MiB above the weights] of one RSA run on a fresh backend."""
        backend = self.backend(max_batch_size=16)
        with self.peak() as peak:
            asyncio.run(MarkovianRSA(backend, cfg).solve("Sum the first hundred odd numbers, step by step."))
        kv = backend.stats.peak_cache_bytes / 2**20
        backend.close()
        return [round(kv, 2), peak["gpu_mib"]]

    @contextlib.contextmanager
    def peak(self) -> Iterator[dict[str, Any]]:
        """Yields a dict whose ``gpu_mib`` is, after the block, the allocator's peak above the start."""
        box: dict[str, Any] = {"gpu_mib": None}
        cuda = self.torch.cuda if self.device.startswith("cuda") else None
        if cuda is not None:
            cuda.synchronize()
            cuda.reset_peak_memory_stats()
            base = cuda.memory_allocated()
        yield box
        if cuda is not None:
            cuda.synchronize()
            box["gpu_mib"] = round((cuda.max_memory_allocated() - base) / 2**20, 1)

    # -- output -------------------------------------------------------------------------------
    def write(self) -> None:
        self.results["seconds"] = round(time.perf_counter() - self.started, 1)
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "results.json").write_text(json.dumps(self.results, indent=2), encoding="utf-8")
        (self.out / "results.md").write_text(markdown(self.results), encoding="utf-8")


def markdown(r: dict[str, Any]) -> str:
    parts = [f"Model: {r['model']}. Device: {r.get('gpu', r['device'])}. Whole run: {r['seconds']} s."]
    if "check" in r:
        parts.append(f"Greedy tokens batched against alone, checked before timing: {r['check']['equal']} of "
                     f"{r['check']['rows']} rows equal (bf16 can flip near-ties; CPU fp32 should be all).")
    if "decode" in r:
        d = r["decode"]
        bound = "unknown" if d["bound_steps_s"] is None else f"{d['bound_steps_s']} steps/s"
        parts += [f"Decode steps/s (warmed up; min and median of {d['repeats']}) against the memory-bandwidth "
                  f"bound: {d['bandwidth_gbs']} GB/s measured copy bandwidth over {d['active_weight_mb']} MB of "
                  f"active weights = {bound}. The step is eager PyTorch: {d['ops_per_step']:,} aten ops per "
                  "single-token forward, each at least one kernel launch, so small batches are launch-bound, "
                  "not bandwidth-bound (CUDA graphs or torch.compile would close that gap).",
                  md_table(["N", "min steps/s", "median steps/s", "median tok/s"], d["rows"])]
    if "context" in r:
        parts += ["One row's decode steps/s after a prompt of L tokens (min and median):",
                  md_table(["L", "min steps/s", "median steps/s"], r["context"]["rows"])]
    if "throughput" in r:
        parts += [f"Generated tokens/s, {r['throughput']['new_tokens']} sampled tokens per row, batched against "
                  "one request at a time:",
                  md_table(["N", "batched tok/s", "one at a time tok/s", "ratio"], r["throughput"]["rows"])]
    if "ragged" in r:
        parts += [f"Ragged rows (10-100% of β={r['ragged']['beta']}) against equal-length rows of the same total, "
                  "N=16:", md_table(["workload", "ragged tok/s", "equal tok/s", "ratio", "kept row-steps"],
                                  r["ragged"]["rows"])]
    if "prefix" in r:
        parts += ["Round 0 of N=16 on one long prompt (4 new tokens each), its prefill shared against not:",
                  md_table(["prefill", "prompt tokens computed", "saved", "wall s", "peak GPU MiB above weights"],
                         r["prefix"]["rows"])]
    if "memory" in r:
        m = r["memory"]
        parts += [f"Peak memory against T, N=4 K=2 β={m['beta']}: Markovian (τ={m['tau']}) against full-chain "
                  f"(τ=β). KV = the backend's peak cache; GPU = allocator peak above the weights (MiB).",
                  md_table(["T", "Markovian KV", "Markovian GPU", "full-chain KV", "full-chain GPU"], m["rounds"]),
                  f"One rollout in chunks (C={m['chunk']}, m={m['carry']}) against one generation of the same length:",
                  md_table(["chunks", "tokens", "chunked KV", "chunked GPU", "single KV", "single GPU"], m["chunks"])]
    if r["skipped"]:
        parts.append(f"Skipped for time: {', '.join(r['skipped'])}.")
    return "\n\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", help="cuda, cuda:N, cpu or auto (default)")
    parser.add_argument("--tiny", action="store_true", help="a two-layer model and small sizes (seconds)")
    parser.add_argument("--layers", type=int, default=None, help="build this many layers (default: all that fit)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer id or directory (default: the embedded model's)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "gpu-results")
    parser.add_argument("--budget", type=float, default=420.0, help="seconds; later sections are skipped past it")
    args = parser.parse_args(argv)

    import torch
    from transformers import AutoTokenizer

    tokenizer = ByteTokenizer() if args.tokenizer is None else AutoTokenizer.from_pretrained(args.tokenizer)
    device, _ = select_device(torch, args.device)
    model, note = build_model(torch, device, tokenizer, tiny=args.tiny, layers=args.layers)
    print(f"[bench-gpu] {note}", file=sys.stderr, flush=True)
    bench = Bench(model, tokenizer, device, TINY if args.tiny else FULL, args.out, args.budget, note)
    for name, run in (("check", bench.check), ("decode", bench.decode), ("context", bench.context),
                      ("throughput", bench.throughput), ("ragged", bench.ragged), ("prefix", bench.prefix),
                      ("memory", bench.memory)):
        bench.section(name, run)
    print(markdown(bench.results))


if __name__ == "__main__":
    main()
