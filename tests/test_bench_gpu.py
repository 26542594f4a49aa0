"""bench/gpu.py, the GPU benchmark, run end to end on CPU with a tiny ZAYA (a smoke test, seconds).

It must be ready for a GPU it cannot be tried on here: every section runs, the result files are
written, and the figures that do not depend on the device already say what they should.
"""

from __future__ import annotations

import json


def test_gpu_benchmark_runs_every_section_on_a_tiny_model(demo_dir, tmp_path):
    from bench.gpu import main

    main(["--tiny", "--device", "cpu", "--tokenizer", str(demo_dir), "--out", str(tmp_path)])
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["skipped"] == [] and "tiny ZAYA: 2 of 2 layers" in result["model"]
    assert [row[0] for row in result["throughput"]["rows"]] == [1, 4, 16]
    assert all(row[1] > 0 and row[2] > 0 for row in result["throughput"]["rows"])
    assert all(row[4] > 0.9 for row in result["ragged"]["rows"]), "almost every row-step was kept"
    (shared, plain) = result["prefix"]["rows"]
    assert shared[1] < plain[1] and shared[2] == plain[1] - shared[1] and plain[2] == 0
    rounds = result["memory"]["rounds"]
    assert all(markov_kv < full_kv for _, markov_kv, _, full_kv, _ in rounds), "τ < β holds less cache"
    assert len({row[1] for row in rounds}) == 1, "the Markovian cache does not grow with T"
    assert "| chunks | tokens |" in (tmp_path / "results.md").read_text()
