"""Figures published for the same task and setting, shown beside a run and marked as published.

Only figures taken from the primary source are listed, each with that source. A row is shown for a
run of the same task and carries its setting (N, K, T, β, τ, final budget), the metric it reports
and the number of problems it covers, so readers compare like with like, and a report says so when
a run beside it covers fewer problems.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Published:
    task: str
    model: str
    method: str
    #: The headline accuracy, in [0, 1].
    accuracy: float
    source: str
    #: The setting the figure was measured at, and what it measures.
    setting: str = ""
    metric: str = ""
    #: How many problems the figure covers (a run over fewer is a subset, and is marked so).
    problems: int | None = None


ZAYA1_REPORT = "ZAYA1-8B technical report, arXiv:2605.05365 (abstract)"

_HEADLINE = "N16 K4 T2 β40960 τ4096, final budget 40960 (preset zaya-40k, the report's headline setting)"
_AVG = "avg@N over the final population"

PUBLISHED: tuple[Published, ...] = (
    Published("aime25", "ZAYA1-8B", "Markovian RSA, 4K-token tail (the report's TTC evaluation)", 0.919,
              ZAYA1_REPORT, _HEADLINE, _AVG, 30),
    Published("hmmt25", "ZAYA1-8B", "Markovian RSA, 4K-token tail (the report's TTC evaluation)", 0.896,
              ZAYA1_REPORT, _HEADLINE, _AVG, 30),
)


def published_for(tasks: set[str]) -> list[Published]:
    return [p for p in PUBLISHED if p.task in tasks]
