"""95% intervals for accuracies over a few dozen problems, where a point estimate misleads.

Where every problem scores 0 or 1 (one repeat of a yes/no measure: maj@N, pass@N, final), the exact
binomial (Clopper-Pearson) interval applies; otherwise (avg@N, fractions per problem, repeats) a
percentile bootstrap over problems, seeded so a report is reproducible.

A plain bootstrap over per-problem means has zero width whenever every problem scores the same
fraction (three problems each at 2/3 give "66.7 [66.7, 66.7]"), which claims a certainty the run
does not have. :func:`interval_units` therefore resamples at every level the data has: problems,
then each problem's repeats, then (binomially) the trials within a repeat. Nothing measured has no
interval at all (``None``), never ``[0, 0]``.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

LEVEL = 0.95


def _binomial_cdf(k: int, n: int, p: float) -> float:
    if p <= 0:
        return 1.0
    if p >= 1:
        return 1.0 if k >= n else 0.0
    return sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k + 1))


def clopper_pearson(successes: int, n: int, level: float = LEVEL) -> tuple[float, float]:
    """The exact binomial interval for ``successes`` out of ``n``."""
    if n <= 0:
        return 0.0, 1.0
    alpha = 1 - level

    def solve(target: float, k: int) -> float:  # the p where P(X <= k) = target, by bisection
        lo, hi = 0.0, 1.0
        for _ in range(60):
            mid = (lo + hi) / 2
            if _binomial_cdf(k, n, mid) > target:
                lo = mid
            else:
                hi = mid
        return (lo + hi) / 2

    lower = 0.0 if successes == 0 else solve(1 - alpha / 2, successes - 1)
    upper = 1.0 if successes == n else solve(alpha / 2, successes)
    return lower, upper


def bootstrap(values: Sequence[float], level: float = LEVEL, resamples: int = 4000, seed: int = 0) -> tuple[float,
                                                                                                            float]:
    """A percentile bootstrap interval for the mean of ``values`` (one value per problem)."""
    if not values:
        return 0.0, 1.0
    rng = random.Random(seed)
    n = len(values)
    means = sorted(sum(values[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples))
    low = means[int((1 - level) / 2 * resamples)]
    high = means[min(resamples - 1, int((1 + level) / 2 * resamples))]
    return low, high


def interval_units(problems: Sequence[Sequence[tuple[int, int]]], level: float = LEVEL, resamples: int = 2000,
                   seed: int = 0) -> tuple[float, float] | None:
    """A 95% interval for the mean over problems of each problem's mean over repeats of successes/trials.

    ``problems`` holds, per problem, one (successes, trials) unit per repeat. Every problem at 0 or 1:
    the exact binomial interval over problems. Otherwise a hierarchical bootstrap: problems, then
    repeats within each, then a binomial draw of each repeat's trials at its observed rate."""
    groups = [[(c, t) for c, t in units if t > 0] for units in problems]
    groups = [g for g in groups if g]
    if not groups:
        return None
    values = [sum(c / t for c, t in g) / len(g) for g in groups]
    if all(v in (0.0, 1.0) for v in values):
        return clopper_pearson(int(sum(values)), len(values), level)
    import numpy as np

    rng = np.random.default_rng(seed)
    n, width = len(groups), max(len(g) for g in groups)
    sizes = np.array([len(g) for g in groups])
    successes = np.zeros((n, width), dtype=np.int64)
    trials = np.ones((n, width), dtype=np.int64)
    for i, g in enumerate(groups):
        for j, (c, t) in enumerate(g):
            successes[i, j], trials[i, j] = c, t
    picked = rng.integers(0, n, size=(resamples, n))                      # problems
    counts = sizes[picked]
    repeat = np.minimum((rng.random((resamples, n, width)) * counts[..., None]).astype(np.int64), width - 1)
    valid = np.arange(width)[None, None, :] < counts[..., None]          # a problem's own number of repeats
    c = successes[picked[..., None], repeat]
    t = trials[picked[..., None], repeat]
    drawn = rng.binomial(t, c / t) / t                                    # trials within a repeat
    problem = np.where(valid, drawn, 0.0).sum(axis=2) / counts
    means = np.sort(problem.mean(axis=1))
    low = float(means[int((1 - level) / 2 * resamples)])
    high = float(means[min(resamples - 1, int((1 + level) / 2 * resamples))])
    return low, high


def interval(values: Sequence[float], level: float = LEVEL) -> tuple[float, float]:
    """The right 95% interval for the mean of per-problem scores (see the module's docstring)."""
    if values and all(v in (0.0, 1.0) for v in values):
        return clopper_pearson(int(sum(values)), len(values), level)
    return bootstrap(values, level)
