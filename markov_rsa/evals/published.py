"""Figures published for the same task and setting, shown beside a run and marked as published.

Only figures taken from the primary source are listed, each with that source. A row is shown for a
run of the same task; the method says which setting it belongs to, so readers compare like with like.
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


ZAYA1_REPORT = "ZAYA1-8B technical report, arXiv:2605.05365 (abstract)"

PUBLISHED: tuple[Published, ...] = (
    Published("aime25", "ZAYA1-8B", "Markovian RSA, 4K-token tail (the report's TTC evaluation)", 0.919,
              ZAYA1_REPORT),
    Published("hmmt25", "ZAYA1-8B", "Markovian RSA, 4K-token tail (the report's TTC evaluation)", 0.896,
              ZAYA1_REPORT),
)


def published_for(tasks: set[str]) -> list[Published]:
    return [p for p in PUBLISHED if p.task in tasks]
