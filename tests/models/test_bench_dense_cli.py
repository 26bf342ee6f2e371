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


def test_every_arm_states_the_papers_objective_and_only_the_dense_keys_differ(bench):
    """The arms do not follow the defaults (the dense and contrastive volume terms, on since the twenty-third
    pass): the base arms are the paper's objective without the dense term, the others add the dense keys."""
    from nnssl_joint.ssl.objective import PAPER_OBJECTIVE, ObjectiveConfig

    arms = bench.arms([2], [16])
    for name, values in arms.items():
        objective = ObjectiveConfig(**values)
        assert objective.lambda_volume_contrast == 0.0
        assert objective.lambda_dense == (1.0 if "+" in name else 0.0), name
        assert {k: getattr(objective, k) for k in PAPER_OBJECTIVE if k != "lambda_dense"} == {
            k: v for k, v in PAPER_OBJECTIVE.items() if k != "lambda_dense"}, name
        base = arms[name.split("+")[0]]
        assert set(values) - set(base) <= {"dense_stage", "dense_keys"}
        assert {k: v for k, v in values.items() if k in base and k != "lambda_dense"} == {
            k: v for k, v in base.items() if k != "lambda_dense"}, name
    assert arms["2d_only"]["lambda_inter"] == arms["2d_only"]["lambda_mask"] == 0.0
