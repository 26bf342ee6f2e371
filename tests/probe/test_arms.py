"""Arm-level probe comparisons over pretraining seeds (nnssl_joint.probe.arms, scripts/probe_arms.py)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from nnssl_joint.errors import NnsslJointError
from nnssl_joint.probe.arms import compare_arms, group_arms, load_probe_runs

CASES = [f"case_{i:03d}" for i in range(8)]


def _run(name: str, per_case: dict[str, list[float]], seed: int | None = None,
         kind: str = "checkpoint") -> dict:
    return {"name": name, "kind": kind, "seed": seed,
            "dice": {"logistic": {"per_case": per_case}, "knn": {"per_case": per_case}}}


def _cases(values: np.ndarray) -> dict[str, list[float]]:
    """(cases, classes) -> probe.json's per_case mapping."""
    return {case: [float(v) for v in row] for case, row in zip(CASES, values)}


def _write(path: Path, weights: list[dict], random_runs: list[dict], cases: list[str] = CASES,
           dataset: str = "Dataset613_SynthOrgans", norm_slices: int | None = None,
           volume_context: int | None = None, volume_context_dims: int | None = None) -> Path:
    settings = {"seed": 0} if norm_slices is None else {"seed": 0, "norm_slices": norm_slices}
    if volume_context is not None:
        settings["volume_context"] = volume_context
    if volume_context_dims is not None:
        settings["volume_context_dims"] = volume_context_dims
    path.write_text(json.dumps({
        "target": {"dataset": dataset, "configuration": "3d_fullres", "test_cases": cases},
        "settings": settings, "weights": weights, "random_runs": random_runs}))
    return path


def _random_runs(rng: np.random.Generator, base: np.ndarray, n: int = 3) -> list[dict]:
    return [_run(f"random#{s}", _cases(base + rng.normal(0, 0.005, base.shape)), seed=s, kind="random")
            for s in range(n)]


def _probe_arms_script():
    """scripts/probe_arms.py as a module (it is a script, not part of the package)."""
    spec = importlib.util.spec_from_file_location(
        "probe_arms", Path(__file__).resolve().parents[2] / "scripts" / "probe_arms.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_an_arm_without_seed_spread_differs_from_another_by_exactly_its_shift(tmp_path):
    rng = np.random.default_rng(0)
    base = rng.uniform(0.1, 0.4, (len(CASES), 3))  # case-to-case spread, shared by every arm (paired by case)
    a = [_run(f"a_s{s}", _cases(base)) for s in range(3)]
    b = [_run(f"b_s{s}", _cases(base + 0.02)) for s in range(4)]
    probe_a = _write(tmp_path / "a.json", a, _random_runs(rng, base - 0.05))
    probe_b = _write(tmp_path / "b.json", b, [])
    weights, random, cases = load_probe_runs([probe_a, probe_b])
    assert cases == CASES and random.shape == (3, len(CASES))
    arms = group_arms(weights, {"A": "a_s*", "B": "b_s*"})
    assert arms == {"A": ["a_s0", "a_s1", "a_s2"], "B": ["b_s0", "b_s1", "b_s2", "b_s3"]}
    result = compare_arms(weights, random, arms, samples=500)
    diff = result["differences"]["B - A"]
    assert diff["difference"] == pytest.approx(0.02)
    # the cases are resampled together for both arms and neither arm varies over seeds: every draw is +0.02
    assert diff["interval"][0] == pytest.approx(0.02) and diff["interval"][1] == pytest.approx(0.02)
    assert diff["share_above_zero"] == 1.0
    # against random (0.05 below, plus noise over its initialisations): the interval holds 0.05 and is narrow
    low, high = result["arms"]["A"]["minus_random_interval"]
    assert low < result["arms"]["A"]["minus_random"] < high
    assert 0.04 < low and high < 0.06


def test_seed_spread_widens_the_interval_and_a_difference_inside_it_is_not_resolved():
    rng = np.random.default_rng(1)
    base = rng.uniform(0.1, 0.4, len(CASES))
    random = np.stack([base - 0.05] * 5)
    shifts = [-0.04, 0.03, -0.02, 0.05, -0.01]  # seed-to-seed spread of several points, mean +0.002
    weights = {f"a_s{s}": base.copy() for s in range(5)}
    weights.update({f"b_s{s}": base + shift for s, shift in enumerate(shifts)})
    result = compare_arms(weights, random, group_arms(weights, {"A": "a_*", "B": "b_*"}), samples=2000)
    diff = result["differences"]["B - A"]
    low, high = diff["interval"]
    assert diff["difference"] == pytest.approx(np.mean(shifts))
    assert low < 0 < high and high - low > 0.03
    assert result["arms"]["B"]["per_seed"] == pytest.approx(list(base.mean() + np.array(shifts)))


def test_files_of_other_test_cases_or_targets_are_refused_by_name(tmp_path):
    rng = np.random.default_rng(2)
    base = rng.uniform(0.1, 0.4, (len(CASES), 3))
    first = _write(tmp_path / "first.json", [_run("a_s0", _cases(base))], _random_runs(rng, base))
    other_cases = _write(tmp_path / "fewer.json", [_run("b_s0", _cases(base[:6]))], [], cases=CASES[:6])
    with pytest.raises(NnsslJointError, match="fewer.json.*6 test cases"):
        load_probe_runs([first, other_cases])
    other_target = _write(tmp_path / "target.json", [_run("b_s0", _cases(base))], [], dataset="Dataset503_X")
    with pytest.raises(NnsslJointError, match="target.json: probed Dataset503_X"):
        load_probe_runs([first, other_target])
    # another read-out of the same runs (--statistics network: 32 slices) does not compare with per-slice ones
    other_readout = _write(tmp_path / "network.json", [_run("b_s0", _cases(base))], [], norm_slices=32)
    with pytest.raises(NnsslJointError, match="network.json: probed .*over 32 slice.*over 1 slice"):
        load_probe_runs([first, other_readout])
    same_readout = _write(tmp_path / "slice.json", [_run("b_s0", _cases(base))], [], norm_slices=1)
    weights, _, _ = load_probe_runs([first, same_readout])  # files before --statistics read per slice
    assert sorted(weights) == ["a_s0", "b_s0"]
    # the volume-context read-out (f_inter's output appended) is another read-out too
    with_context = _write(tmp_path / "context.json", [_run("b_s0", _cases(base))], [], volume_context=32)
    with pytest.raises(NnsslJointError, match="context.json: probed .*f_inter context over 32 .*no f_inter"):
        load_probe_runs([first, with_context])
    without_context = _write(tmp_path / "plain.json", [_run("b_s0", _cases(base))], [], volume_context=0)
    weights, _, _ = load_probe_runs([first, without_context])
    assert sorted(weights) == ["a_s0", "b_s0"]
    # so is the context reduced to its principal components (--volume-context-dims)
    full = _write(tmp_path / "full.json", [_run("c_s0", _cases(base))], [], volume_context=32)
    reduced = _write(tmp_path / "reduced.json", [_run("d_s0", _cases(base))], [], volume_context=32,
                     volume_context_dims=8)
    with pytest.raises(NnsslJointError, match="reduced.json: .*over 32 slices, 8 principal components"):
        load_probe_runs([full, reduced])


def test_names_twice_disagreeing_random_seeds_and_no_random_runs_are_errors(tmp_path):
    rng = np.random.default_rng(3)
    base = rng.uniform(0.1, 0.4, (len(CASES), 3))
    first = _write(tmp_path / "first.json", [_run("a_s0", _cases(base))], _random_runs(rng, base))
    twice = _write(tmp_path / "twice.json", [_run("a_s0", _cases(base))], [])
    with pytest.raises(NnsslJointError, match="twice.json.*'a_s0' appears twice.*NAME=PATH"):
        load_probe_runs([first, twice])
    other_random = _write(tmp_path / "other_random.json", [_run("b_s0", _cases(base))],
                          _random_runs(rng, base))
    with pytest.raises(NnsslJointError, match="other_random.json: random initialisation seed 0"):
        load_probe_runs([first, other_random])
    no_random = _write(tmp_path / "no_random.json", [_run("a_s0", _cases(base))], [])
    with pytest.raises(NnsslJointError, match="--random-seeds"):
        load_probe_runs([no_random])
    with pytest.raises(NnsslJointError, match="missing.json: no such probe.json"):
        load_probe_runs([tmp_path / "missing.json"])


def test_patterns_must_match_and_must_not_overlap():
    weights = {"joint_s0": np.zeros(2), "joint_s1": np.zeros(2), "intra_s0": np.zeros(2)}
    with pytest.raises(NnsslJointError, match="arm 'x': no probed weights name matches 'x_\\*'.*intra_s0"):
        group_arms(weights, {"x": "x_*"})
    with pytest.raises(NnsslJointError, match="'joint_s0' match the patterns of arms 'all' and 'joint'"):
        group_arms(weights, {"all": "*", "joint": "joint_*"})


def test_the_script_prints_the_table_and_writes_the_numbers(tmp_path, capsys):
    rng = np.random.default_rng(4)
    base = rng.uniform(0.1, 0.4, (len(CASES), 3))
    probe = _write(tmp_path / "probe.json", [_run(f"j_s{s}", _cases(base + 0.01 * s)) for s in range(3)],
                   _random_runs(rng, base))
    module = _probe_arms_script()
    out = tmp_path / "arms.json"
    assert module.main([str(probe), "--arm", "joint=j_s*", "--samples", "200", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "| joint | 3 |" in table and "| random init | 3 |" in table
    written = json.loads(out.read_text())
    assert written["arms"]["joint"]["weights"] == ["j_s0", "j_s1", "j_s2"]
    assert written["test_cases"] == CASES
    assert module.main([str(probe), "--arm", "joint=nothing*"]) == 2
    assert "no probed weights name matches 'nothing*'" in capsys.readouterr().err


def test_one_class_is_compared_on_its_own_and_cases_without_it_are_left_out(tmp_path, capsys):
    """--class K: an arm that differs from another only in class 2 differs by exactly that shift there and
    by nothing in class 1; a case where class 2 is absent (NaN in every run) does not enter."""
    rng = np.random.default_rng(6)
    base = rng.uniform(0.1, 0.4, (len(CASES), 3))
    base[1, 1] = np.nan  # case 1 has no class 2 in prediction or reference
    shifted = base.copy()
    shifted[:, 1] += 0.05
    probe = _write(tmp_path / "probe.json", [_run(f"a_s{s}", _cases(base)) for s in range(2)]
                   + [_run(f"b_s{s}", _cases(shifted)) for s in range(2)], _random_runs(rng, base))
    for label_class, expected in ((1, 0.0), (2, 0.05)):
        weights, random, _ = load_probe_runs([probe], label_class=label_class)
        result = compare_arms(weights, random, group_arms(weights, {"A": "a_s*", "B": "b_s*"}), samples=300)
        diff = result["differences"]["B - A"]
        assert diff["difference"] == pytest.approx(expected)
        assert diff["interval"] == pytest.approx((expected, expected))
        assert result["arms"]["A"]["mean"] == pytest.approx(np.nanmean(base[:, label_class - 1]))
    weights, _, _ = load_probe_runs([probe])  # the mean over classes dilutes the shift to a third
    assert np.nanmean(weights["b_s0"] - weights["a_s0"]) == pytest.approx(0.05 / 3, abs=0.01)
    with pytest.raises(NnsslJointError, match="probe.json: --class 4, but 'a_s0' has Dice of 3 foreground"):
        load_probe_runs([probe], label_class=4)
    module = _probe_arms_script()
    out = tmp_path / "arms.json"
    assert module.main([str(probe), "--arm", "A=a_s*", "--arm", "B=b_s*", "--class", "2", "--samples", "100",
                        "--json", str(out)]) == 0
    written = json.loads(out.read_text())
    assert written["label_class"] == 2
    assert written["differences"]["B - A"]["difference"] == pytest.approx(0.05)


def test_two_arms_compare_without_random_initialisations_and_one_arm_needs_them(tmp_path, capsys):
    """Files without --random-seeds runs: arm - arm is computed (the same difference as with random rows, and
    an exact interval where neither arm varies over seeds); one arm alone has nothing to compare with."""
    rng = np.random.default_rng(7)
    base = rng.uniform(0.1, 0.4, (len(CASES), 3))
    no_random = _write(tmp_path / "no_random.json", [_run(f"a_s{s}", _cases(base)) for s in range(2)]
                       + [_run(f"b_s{s}", _cases(base + 0.03)) for s in range(3)], [])
    weights, random, _ = load_probe_runs([no_random], require_random=False)
    assert random.shape == (0, len(CASES))
    result = compare_arms(weights, random, group_arms(weights, {"A": "a_s*", "B": "b_s*"}), samples=300)
    assert result["random"] is None and "minus_random" not in result["arms"]["A"]
    assert result["differences"]["B - A"]["difference"] == pytest.approx(0.03)
    assert result["differences"]["B - A"]["interval"] == pytest.approx((0.03, 0.03))
    with_random = _write(tmp_path / "with_random.json", json.loads(no_random.read_text())["weights"],
                         _random_runs(rng, base))
    weights_r, random_r, _ = load_probe_runs([with_random])
    result_r = compare_arms(weights_r, random_r, group_arms(weights_r, {"A": "a_s*", "B": "b_s*"}),
                            samples=300)
    assert result_r["differences"]["B - A"]["difference"] == pytest.approx(0.03)
    module = _probe_arms_script()
    out = tmp_path / "arms.json"
    assert module.main([str(no_random), "--arm", "A=a_s*", "--arm", "B=b_s*", "--samples", "100",
                        "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "random init" not in table and "| B - A | +3.0 [+3.0, +3.0] |" in table
    assert json.loads(out.read_text())["random"] is None
    assert module.main([str(no_random), "--arm", "A=a_s*"]) == 2
    assert "no_random.json'] has random initialisations; run one of the probes with --random-seeds" \
        in capsys.readouterr().err
