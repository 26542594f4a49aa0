"""Paired comparison of two runs on the problems both planned: is the difference more than chance?

Two runs over the same problems are paired data: a problem RSA fixed and one it broke cancel out,
and a problem both got right says nothing about which is better. Where every problem scores 0 or 1
in both runs (one repeat of ``final``), the exact McNemar test applies (a two-sided binomial test on
the discordant problems). Otherwise (avg@N, repeats) a paired sign-flip permutation test on the
per-problem differences: exact up to :data:`EXACT_UP_TO` non-zero differences, seeded Monte Carlo
beyond. The settings that differ are listed beside the figures, so a reader sees what was compared.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from markov_rsa.evals.metrics import problem_means, units

if TYPE_CHECKING:
    from markov_rsa.evals.report import RunData

#: Up to this many non-zero paired differences the permutation test enumerates every sign pattern.
EXACT_UP_TO = 16


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts."""
    n = only_a + only_b
    if n == 0:
        return 1.0
    k = min(only_a, only_b)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def sign_flip(differences: Sequence[float], resamples: int = 20000, seed: int = 0) -> float:
    """Two-sided paired permutation p-value for a mean difference of zero."""
    values = [d for d in differences if d != 0]
    if not values:
        return 1.0
    observed = abs(sum(values))
    if len(values) <= EXACT_UP_TO:
        patterns = list(itertools.product((1, -1), repeat=len(values)))
        hits = sum(1 for signs in patterns if abs(sum(s * v for s, v in zip(signs, values, strict=True)))
                   >= observed - 1e-12)
        return hits / len(patterns)
    rng = random.Random(seed)
    hits = sum(1 for _ in range(resamples)
               if abs(sum(v if rng.random() < 0.5 else -v for v in values)) >= observed - 1e-12)
    return (hits + 1) / (resamples + 1)


@dataclass(frozen=True)
class Comparison:
    baseline: str
    run: str
    task: str
    metric: str
    #: Problems both runs planned (the only ones compared).
    shared: int
    baseline_value: float
    run_value: float
    only_baseline: list[str] = field(default_factory=list)
    only_run: list[str] = field(default_factory=list)
    test: str = ""
    p_value: float = 1.0
    #: Problems only one of the two planned (left out of the comparison).
    unshared: int = 0

    @property
    def difference(self) -> float:
        return self.run_value - self.baseline_value

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "difference": self.difference}


def compare(baseline: RunData, run: RunData, metric: str = "final") -> Comparison:
    """Compare ``run`` with ``baseline`` on ``metric`` (``final`` or ``avg``) over shared problems."""
    a = problem_means(units(baseline.plan, metric))
    b = problem_means(units(run.plan, metric))
    shared = [pid for pid in a if pid in b]
    unshared = len(set(a) ^ set(b))
    if not shared:
        return Comparison(baseline.name, run.name, run.task, metric, 0, 0.0, 0.0, unshared=unshared,
                          test="none (no shared problems)")
    binary = all(a[p] in (0.0, 1.0) and b[p] in (0.0, 1.0) for p in shared)
    only_a = [p for p in shared if a[p] > b[p]]
    only_b = [p for p in shared if b[p] > a[p]]
    if binary:
        test, p_value = "exact McNemar", mcnemar_exact(len(only_a), len(only_b))
    else:
        test, p_value = "paired sign-flip permutation", sign_flip([b[p] - a[p] for p in shared])
    return Comparison(baseline.name, run.name, run.task, metric, len(shared),
                      sum(a[p] for p in shared) / len(shared), sum(b[p] for p in shared) / len(shared),
                      only_a, only_b, test, p_value, unshared)


def config_diff(baseline: RunData, run: RunData) -> dict[str, tuple[Any, Any]]:
    """Every setting (and the model) that differs between two runs, as (baseline, run)."""
    left = {**baseline.config, "model": baseline.backend.get("model"), "task": baseline.task}
    right = {**run.config, "model": run.backend.get("model"), "task": run.task}
    return {key: (left.get(key), right.get(key)) for key in sorted(set(left) | set(right))
            if left.get(key) != right.get(key)}
