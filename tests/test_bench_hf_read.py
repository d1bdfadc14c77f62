"""The hf read benchmark reads and checks the set it builds, every row accounted for."""

import pytest

from tests.conftest import benchmark

datasets = pytest.importorskip("datasets")
bench = benchmark("bench_hf_read")


def test_the_built_set_is_read_and_checked_in_full(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    parquet = bench.build(tmp_path / "set", rows=40, films=3)
    for what in ("read", "streaming", "check"):
        run = bench.measure(parquet, what)
        assert run["rows_total"] == run["examples"] == 40 and run["skipped"] == 0, (what, run)
        assert run["seconds"] >= 0 and run["peak_rss_mb"] > 0
    assert bench.machine()["cpus"] >= 1
