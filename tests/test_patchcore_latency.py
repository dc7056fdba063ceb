"""benchmarks/patchcore_latency.py: the cavga side times the default's own inference path with its full memory,
and the comparison refuses to run without anomalib's interpreter (anomalib is not a dependency)."""

from __future__ import annotations

import pytest

from benchmark_scripts import load_benchmark


def test_the_cavga_worker_times_the_default_with_its_full_trunk_memory():
    script = load_benchmark("patchcore_latency")
    result = script.cavga_worker(repeats=2)
    assert result["memory_rows"] == 8192 and result["channels"] == 176  # the default's trunk_knn memory
    assert len(result["total_ms"]) == 2 and len(result["search_ms"]) == 2
    assert all(t > 0 for t in result["total_ms"] + result["search_ms"])


def test_the_comparison_needs_anomalibs_interpreter(capsys):
    script = load_benchmark("patchcore_latency")
    with pytest.raises(SystemExit):
        script.main(["--rounds", "1"])
    assert "--anomalib-python is required" in capsys.readouterr().err
