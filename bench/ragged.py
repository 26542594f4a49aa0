"""Ragged rounds on the local backend: rows that end at different times, and several problems at once.

A real round's traces stop anywhere between a few hundred tokens and β. The local backend's
running batch drops rows as they end and lets waiting requests join, so tokens/s on ragged work
should approach tokens/s on equal-length work of the same total whenever there is work waiting.
Measured side by side in one process on SmolLM2-135M (CPU, fp32):

* ragged (lengths spread evenly over 10-100% of β) against equal-length requests of the same
  total, N=16, with distinct prompts of similar length (as a round's aggregation prompts are), for
  the rounds of several problems in flight (what ``rsa eval`` runs) and for one round alone
  (nothing waiting: the batch can only shrink as rows end);
* an evaluation of several problems at once against one problem at a time (tokens/s);
* the share of row-steps whose token was kept (the rest is the end-of-text token of each row).
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.tables import md_table
from markov_rsa import GenerationRequest, RSAConfig, SamplingParams

N = 16
BETA = 96
ROUNDS_IN_FLIGHT = 16
PROBLEMS = 4
SUBJECTS = ("a lighthouse keeper", "a river pilot", "a glassblower", "a mountain guide", "a night-train conductor",
            "a beekeeper", "a cartographer", "a clockmaker")


def ragged_lengths(n: int = N, beta: int = BETA) -> list[int]:
    """n lengths spread evenly over 10-100% of beta."""
    low = max(1, beta // 10)
    return [round(low + (beta - low) * i / (n - 1)) for i in range(n)]


async def _throughput(backend: Any, lengths: list[int], seed: int) -> tuple[float, int, float]:
    """(tokens/s, tokens, kept share of row-steps) for one burst of requests."""
    before = backend.stats
    start = time.perf_counter()
    gens = await asyncio.gather(*(
        backend.generate(GenerationRequest(_story(i), n, SamplingParams(temperature=0.8, seed=seed + i)))
        for i, n in enumerate(lengths)))
    wall = time.perf_counter() - start
    after = backend.stats
    tokens = sum(g.completion_tokens for g in gens)
    return tokens / wall, tokens, (after.kept_tokens - before.kept_tokens) / max(1, after.row_steps - before.row_steps)


def _story(i: int) -> tuple[dict[str, str], ...]:
    """Distinct prompts of about the same length, as an aggregation round's are."""
    subject = SUBJECTS[i % len(SUBJECTS)]
    return ({"role": "user", "content": f"Write a very long story about {subject}, chapter by chapter (part {i})."},)


def bench_ragged(model_dir: Path, datasets: Path) -> dict[str, Any]:
    from markov_rsa.backends.transformers import TransformersBackend

    backend = TransformersBackend(model_dir, device="cpu", max_batch_size=N)
    ragged = ragged_lengths()
    equal = [round(sum(ragged) / len(ragged))] * N

    async def measure() -> list[list[Any]]:
        await _throughput(backend, [8] * 4, 0)  # warm-up
        rows = []
        for label, copies in ((f"{ROUNDS_IN_FLIGHT} rounds in flight", ROUNDS_IN_FLIGHT), ("one round alone", 1)):
            r_rate, r_tokens, r_kept = await _throughput(backend, ragged * copies, 1000)
            e_rate, e_tokens, _ = await _throughput(backend, equal * copies, 1000)
            rows.append([label, N * copies, f"{r_tokens:,}", f"{r_rate:.1f}", f"{e_tokens:,}", f"{e_rate:.1f}",
                         f"**{r_rate / e_rate:.2f}**", f"{r_kept:.1%}"])
        return rows

    rows = asyncio.run(measure())
    one, several = _eval_rates(backend, datasets)
    backend.close()
    return {"rows": rows, "beta": BETA, "lengths": f"{ragged[0]}-{ragged[-1]}", "equal": equal[0],
            "eval_one": one, "eval_several": several, "problems": PROBLEMS,
            "padding": bench_padding(model_dir), "padding_prompt": LONG_PROMPT_TOKENS}


#: About how many tokens the long prompt of the padding figure has (75 sentences of 8 tokens).
LONG_PROMPT_TOKENS = 600


def bench_padding(model_dir: Path) -> list[list[Any]]:
    """One long prompt decoding while short requests join: held KV and wall time with the padding
    cap (``max_padding``) at its default and off, and the short rows alone. Rows: [workload, peak
    rows, peak KV MiB, wall s]."""
    from markov_rsa.backends.transformers import TransformersBackend

    long = GenerationRequest(({"role": "user", "content": "Summarise. " + "The tide came in over the flats. " * 75},),
                             48, SamplingParams(temperature=0))
    short = [GenerationRequest(_story(i), 24, SamplingParams(temperature=0)) for i in range(12)]
    rows = []
    for cap in (0.5, 1.0, None):
        backend = TransformersBackend(model_dir, device="cpu", max_batch_size=N, max_padding=cap or 1.0)

        async def run(backend: Any = backend, cap: float | None = cap) -> float:
            start = time.perf_counter()
            first = None if cap is None else asyncio.create_task(backend.generate(long))
            while first is not None and backend.stats.steps == 0:
                await asyncio.sleep(0.001)
            await asyncio.gather(*(backend.generate(r) for r in short))
            if first is not None:
                await first
            return time.perf_counter() - start

        wall = asyncio.run(run())
        stats = backend.stats
        backend.close()
        label = "short rows alone" if cap is None else f"long + short, max_padding={cap}"
        rows.append([label, stats.peak_rows, round(stats.peak_cache_bytes / 2**20, 1), round(wall, 1)])
    return rows


def _eval_rates(backend: Any, datasets: Path) -> tuple[float, float]:
    """Generated tokens/s of an AIME evaluation (N=4, K=2, T=1), one problem at a time and all at once."""
    from markov_rsa.evals.benchmarks import load_task
    from markov_rsa.evals.grading.math import MathGrader
    from markov_rsa.evals.runner import EvalSpec, Evaluation

    config = RSAConfig(population=4, k=2, rounds=1, budget=48, tail=16, seed=3, temperature=0.8)

    async def rate(concurrency: int) -> float:
        spec = EvalSpec("aime25", config, limit=PROBLEMS, concurrency=concurrency)
        with tempfile.TemporaryDirectory() as out, MathGrader(workers=1) as grader:
            evaluation = Evaluation(spec, backend, load_task("aime25", datasets), Path(out), math_grader=grader)
            before = backend.stats.kept_tokens
            start = time.perf_counter()
            await evaluation.run()
            return (backend.stats.kept_tokens - before) / (time.perf_counter() - start)

    async def both() -> tuple[float, float]:
        return await rate(1), await rate(PROBLEMS)

    return asyncio.run(both())


def markdown(result: dict[str, Any]) -> list[str]:
    return [
        "### Ragged rounds",
        f"Sampled rollouts whose lengths are spread evenly over 10-100% of β={result['beta']} "
        f"({result['lengths']} tokens) against rollouts of equal length ({result['equal']} tokens: the same "
        f"total), distinct prompts, N=16 rows at most in the batch. Rows leave the batch when they end and "
        f"waiting requests join it. Target: ragged ≥ 0.9× equal-length where work is waiting. *kept* is the "
        f"share of row-steps whose token a completion kept (the others computed each row's end-of-text token).",
        md_table(["workload", "requests", "ragged tokens", "ragged tok/s", "equal tokens", "equal tok/s",
               "ragged / equal", "kept"], result["rows"]),
        "Reading: with rounds waiting, a row that ends is replaced at the next step (from requests prefilled a "
        "few at a time, ahead of need), so the batch stays full until the work runs out; what is left of the "
        "gap is that last tail (about β/2 steps once per workload, so its share falls as more rounds wait: "
        "an evaluation keeps many problems in flight) and the joins' prefills. A round alone can only shrink "
        "as its rows end: no padding is computed, but on this CPU a step of few rows costs nearly what a step "
        "of 16 does, so its ratio stays near the share of row-slots in use (before rows could leave, 16 rows "
        "over 16-160 tokens measured 0.55×).",
        f"`rsa eval` (AIME 2025, N=4 K=2 T=1, β=48): **{result['eval_several']:.1f}** generated tok/s with "
        f"{result['problems']} problems at once against {result['eval_one']:.1f} one problem at a time "
        f"(**{result['eval_several'] / result['eval_one']:.1f}×**): the problems' rounds share the batch. The "
        "gain is bounded here because the four problems' prompts differ in length (about 100 to 900 tokens), "
        "every row of a padded batch attends over the longest one's width, and on a CPU that per-step cost "
        "grows with rows × width.",
        *([f"A {result['padding_prompt']}-token prompt decoding while 12 short requests join (SmolLM2, greedy): "
           "the cap on the running cache's padding share (`max_padding`, default 0.5) against no cap, and the "
           "short rows alone. Peak KV counts running and staged rows and the copy a join makes.",
           md_table(["workload", "peak rows", "peak KV MiB", "wall s"], result["padding"])]
          if "padding" in result else []),
    ]
