"""bench/gpu.py, the GPU benchmark, run end to end on CPU with a tiny ZAYA (a smoke test, seconds).

It must be ready for a GPU it cannot be tried on here: every section runs, the result files are
written, and the figures that do not depend on the device already say what they should.
"""

from __future__ import annotations

import json


def test_gpu_benchmark_runs_every_section_on_a_tiny_model(tmp_path, monkeypatch):
    from bench.gpu import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the GPU machine is offline: nothing may be fetched
    main(["--tiny", "--device", "cpu", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["skipped"] == [] and "tiny ZAYA: 2 of 2 layers" in result["model"]
    assert result["check"]["equal"] == result["check"]["rows"] == 4, "greedy rows batched equal them alone on CPU"
    decode = result["decode"]
    assert [row[0] for row in decode["rows"]] == [1, 4, 16]
    assert all(0 < low <= median for _, low, median, _ in decode["rows"])
    assert decode["bound_steps_s"] > 0 and decode["ops_per_step"] > 10 and decode["active_weight_mb"] > 0
    assert [row[0] for row in result["context"]["rows"]] == [64, 256]
    assert [row[0] for row in result["throughput"]["rows"]] == [1, 4, 16]
    assert all(row[1] > 0 and row[2] > 0 for row in result["throughput"]["rows"])
    assert all(row[4] > 0.9 for row in result["ragged"]["rows"]), "almost every row-step was kept"
    (shared, plain) = result["prefix"]["rows"]
    assert shared[1] < plain[1] and shared[2] == plain[1] - shared[1] and plain[2] == 0
    rounds = result["memory"]["rounds"]
    assert all(markov_kv < full_kv for _, markov_kv, _, full_kv, _ in rounds), "τ < β holds less cache"
    assert len({row[1] for row in rounds}) == 1, "the Markovian cache does not grow with T"
    report = (tmp_path / "results.md").read_text()
    assert "| chunks | tokens |" in report and "aten ops" in report and "| L |" in report
