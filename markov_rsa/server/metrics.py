"""Counters of one server, rendered in Prometheus' text format at ``/metrics``."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any


@dataclass
class Metrics:
    runs_in_flight: int = 0
    runs_total: int = 0
    runs_rejected_total: int = 0
    passthrough_total: int = 0
    generations_total: int = 0
    completion_tokens_total: int = 0
    prompt_tokens_total: int = 0
    upstream_errors_total: int = 0
    client_disconnects_total: int = 0

    def render(self, backend_stats: dict[str, Any] | None = None) -> str:
        lines = []
        for f in fields(self):
            kind = "gauge" if f.name == "runs_in_flight" else "counter"
            lines += [f"# TYPE markov_rsa_{f.name} {kind}", f"markov_rsa_{f.name} {getattr(self, f.name)}"]
        for name, value in sorted((backend_stats or {}).items()):
            lines += [f"# TYPE markov_rsa_backend_{name}_total counter", f"markov_rsa_backend_{name}_total {value}"]
        return "\n".join(lines) + "\n"
