"""Argument handling and report of scripts/bench_dense.py, on a tiny configuration (CPU, seconds)."""

import json

import pytest


@pytest.fixture(scope="module")
def bench(load_script):
    return load_script("bench_dense")


def test_tiny_run_reports_every_arm_and_writes_json(bench, tmp_path, restore_torch_threads):
    out = tmp_path / "bench.json"
    report = bench.main(["--stages", "2", "--keys", "16", "--repeats", "1", "--view", "32", "--batch-2d", "4",
                         "--batch-3d", "1", "--slices", "4", "--out", str(out)])
    assert json.loads(out.read_text()) == report
    dense = {"joint+dense_stage2", "2d_only+dense_stage2", "joint+dense_stage2_keys16",
             "2d_only+dense_stage2_keys16"}
    assert set(report["seconds_median"]) == {"joint", "2d_only"} | dense
    assert all(v > 0 for v in report["seconds_median"].values())
    assert set(report["ratio_to_same_objective_without_dense"]) == dense
    assert report["command"].startswith("python scripts/bench_dense.py --stages 2")


def test_bad_arguments_are_refused(bench):
    for argv in (["--repeats", "0"], ["--stages", "-1"], ["--keys", "0"]):
        with pytest.raises(SystemExit):
            bench.parse_args(argv)
