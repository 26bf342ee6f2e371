"""``nnssl_joint benchmark``: splits, the linked target with its test split, statistics, budgets,
resumability, and one real run through nnU-Net on a tiny dataset without imagesTs."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnssl_joint.datasets.synthetic import make_synthetic
from nnssl_joint.errors import NnsslJointError
from nnssl_joint.experiments import benchmark as bm
from nnssl_joint.experiments import pipeline

# ----------------------------------------------------------------------------------------------------
# arguments


def test_parse_labeled_and_arms():
    assert bm.parse_labeled("4, 1,2,2") == [1, 2, 4]
    with pytest.raises(NnsslJointError, match="comma-separated integers"):
        bm.parse_labeled("one,two")
    with pytest.raises(NnsslJointError, match=">= 1"):
        bm.parse_labeled("0,1")
    assert bm.parse_arms("joint,scratch,joint") == ["joint", "scratch"]
    # by default every pretrained arm is compared with both baselines (issue 16)
    default = bm.BenchmarkSettings(pretrain=["1"], target="2", out=Path("x"), raw=Path("."), labeled=[1])
    assert default.arms == ["scratch", "nnunet", "intra", "joint"]
    with pytest.raises(NnsslJointError, match=r"unknown arm\(s\) \['simclr'\]"):
        bm.parse_arms("scratch,simclr")


# ----------------------------------------------------------------------------------------------------
# splits


def test_splits_are_nested_over_labeled_counts_and_share_the_validation_cases():
    pool = [f"case_{i:02d}" for i in range(10)]
    for seed in range(4):
        splits = {k: bm.benchmark_split(pool, k, seed, n_val=2) for k in (1, 2, 4, 6)}
        val = splits[1]["val"]
        assert len(val) == 2
        for k, split in splits.items():
            assert len(split["train"]) == k
            assert split["val"] == val
            assert not set(split["train"]) & set(val)
        assert (set(splits[1]["train"]) < set(splits[2]["train"]) < set(splits[4]["train"])
                < set(splits[6]["train"]))
    # seeds draw different cases, and the same seed always the same
    assert bm.benchmark_split(pool, 2, 0) == bm.benchmark_split(list(reversed(pool)), 2, 0)
    assert len({tuple(bm.benchmark_split(pool, 2, s)["train"]) for s in range(6)}) > 1


def test_split_refuses_a_pool_too_small_and_names_the_flags():
    with pytest.raises(NnsslJointError, match=r"need 5 cases.*has 4.*--labeled"):
        bm.benchmark_split(["a", "b", "c", "d"], 4, 0)


def test_zero_validation_cases_validate_on_the_labeled_cases_and_stay_nested():
    pool = [f"c{i}" for i in range(6)]
    one = bm.benchmark_split(pool, 1, seed=2, n_val=0)
    two = bm.benchmark_split(pool, 2, seed=2, n_val=0)
    assert one["val"] == one["train"] and len(one["train"]) == 1 and set(one["train"]) <= set(two["train"])
    assert bm.benchmark_split(["only"], 1, seed=0, n_val=0) == {"train": ["only"], "val": ["only"]}


def test_held_out_cases_fraction_and_limits():
    pool = [f"c{i}" for i in range(8)]
    held = bm.held_out_cases(pool, 0.25, 0)
    assert len(held) == 2 and set(held) <= set(pool)
    assert held == bm.held_out_cases(pool, 0.25, 0)
    assert len(bm.held_out_cases(pool[:3], 0.1, 0)) == 1  # at least one
    with pytest.raises(NnsslJointError, match="leaves 1, fewer than the 2 .*--val-cases 0"):
        bm.held_out_cases(pool[:2], 0.5, 0)
    assert len(bm.held_out_cases(pool[:2], 0.5, 0, keep=1)) == 1  # one labeled case validating itself
    with pytest.raises(NnsslJointError, match="between 0 and 1"):
        bm.held_out_cases(pool, 1.0, 0)


# ----------------------------------------------------------------------------------------------------
# the linked target


@pytest.fixture(scope="module")
def synthetic_raw(module_tmp_path) -> Path:
    raw = module_tmp_path / "raw"
    raw.mkdir()
    make_synthetic(raw, seed=3, n_3d=3, n_2d=4, n_labeled_train=5, n_labeled_test=2, shape_3d=(16, 24, 24),
                   ids=(611, 612, 613), n_organs=2)
    return raw


def _tree(folder: Path) -> dict[str, float]:
    return {str(p.relative_to(folder)): p.stat().st_mtime for p in folder.rglob("*")}


def test_link_target_uses_its_own_test_split_and_leaves_the_source_alone(synthetic_raw, tmp_path):
    source = synthetic_raw / "Dataset613_SynthOrgans"
    before = _tree(source)
    info = bm.link_target_dataset(source, tmp_path / source.name, 0.25, seed=0)
    assert _tree(source) == before
    derived = tmp_path / source.name
    assert info["test_source"] == "imagesTs/labelsTs"
    assert sorted(p.name for p in (derived / "labelsTs").iterdir()) == sorted(
        p.name for p in (source / "labelsTs").iterdir())
    assert len(list((derived / "imagesTr").iterdir())) == 5
    assert all(p.is_symlink() for p in (derived / "imagesTr").iterdir())
    assert json.loads((derived / "dataset.json").read_text())["numTraining"] == 5


def test_link_target_holds_out_training_cases_when_there_is_no_test_split(synthetic_raw, tmp_path):
    source = tmp_path / "src" / "Dataset613_SynthOrgans"
    source.parent.mkdir()
    import shutil

    shutil.copytree(synthetic_raw / "Dataset613_SynthOrgans", source, ignore=shutil.ignore_patterns("*Ts"))
    info = bm.link_target_dataset(source, tmp_path / "out" / source.name, 0.4, seed=1)
    derived = tmp_path / "out" / source.name
    test = info["test_cases"]
    assert len(test) == 2 and info["test_source"].startswith("0.4 of imagesTr")
    train_pool = {p.name.split("_0000")[0] for p in (derived / "imagesTr").iterdir()}
    assert train_pool == set(info["training_pool"]) and not train_pool & set(test)
    assert sorted(p.name.split(".")[0] for p in (derived / "labelsTs").iterdir()) == test
    assert json.loads((derived / "dataset.json").read_text())["numTraining"] == 3


def test_link_target_names_a_missing_label(synthetic_raw, tmp_path):
    import shutil

    source = tmp_path / "Dataset613_SynthOrgans"
    shutil.copytree(synthetic_raw / "Dataset613_SynthOrgans", source)
    victim = sorted((source / "labelsTr").iterdir())[1]
    victim.unlink()
    with pytest.raises(NnsslJointError, match=victim.name.replace(".", r"\.")):
        bm.link_target_dataset(source, tmp_path / "out" / source.name, 0.25, 0)
    assert not (tmp_path / "out" / source.name).exists()


def test_link_target_refuses_an_unlabeled_dataset(synthetic_raw, tmp_path):
    with pytest.raises(NnsslJointError, match="foreground class"):
        bm.link_target_dataset(synthetic_raw / "Dataset611_SynthUnlabeled3D", tmp_path / "x", 0.25, 0)


# ----------------------------------------------------------------------------------------------------
# statistics


def _run(mean_per_case: list[list[float]]) -> dict:
    dice = {f"t{i}": {str(c + 1): v for c, v in enumerate(row)} for i, row in enumerate(mean_per_case)}
    return {"dice": dice, "mean_dice": bm.run_mean_dice(dice)}


def test_run_mean_dice_skips_undefined_classes():
    assert bm.run_mean_dice({"a": {"1": 0.5, "2": float("nan")},
                             "b": {"1": 0.2, "2": 0.4}}) == pytest.approx(0.4)


def test_aggregate_mean_spread_and_paired_gain():
    results = {
        "scratch/L1_s0": _run([[0.2, 0.4]]), "scratch/L1_s1": _run([[0.1, 0.1]]),
        "joint/L1_s0": _run([[0.3, 0.5]]), "joint/L1_s1": _run([[0.1, 0.3]]),
    }
    table = bm.aggregate(results, ["scratch", "joint"], [1, 2], [0, 1], {"1": "a", "2": "b"})
    scratch, joint = table["scratch"]["1"], table["joint"]["1"]
    assert scratch["dice"]["mean"] == pytest.approx(0.2)
    assert scratch["dice"]["std"] == pytest.approx(np.std([0.3, 0.1], ddof=1))
    assert joint["per_class"]["2"]["mean"] == pytest.approx(0.4)
    assert joint["gain_vs_scratch_points"]["mean"] == pytest.approx(10.0)
    assert joint["gain_vs_scratch_points"]["std"] == pytest.approx(0.0, abs=1e-9)
    assert joint["wins_vs_scratch"] == "2/2"
    assert joint["gain_vs_scratch_points"]["ci95"] == pytest.approx([10.0, 10.0])  # equal gains: no spread
    assert "gain_vs_scratch_points" not in scratch
    assert table["joint"]["2"]["dice"]["n"] == 0 and table["joint"]["2"]["dice"]["mean"] is None


def test_bootstrap_interval_of_the_paired_gain_over_seeds():
    # two seeds, gains 0 and 10: a resample is both seeds 0 (p = 1/4), both 10 (1/4) or mixed, so the 2.5
    # and 97.5 percentiles are the extremes
    assert bm.bootstrap_interval([0.0, 10.0]) == pytest.approx([0.0, 10.0])
    gains = [7.0, -1.0, 12.0, 3.0, 9.0]
    low, high = bm.bootstrap_interval(gains)
    assert min(gains) < low < np.mean(gains) < high < max(gains)
    assert bm.bootstrap_interval(gains) == [low, high]  # reproducible
    wider = bm.bootstrap_interval([x * 3 - 2 * np.mean(gains) for x in gains])  # 3x the spread, same mean
    assert wider[1] - wider[0] == pytest.approx(3 * (high - low))
    assert bm.bootstrap_interval([4.0]) is None and bm.bootstrap_interval([]) is None


def test_spread_of_one_value_has_no_standard_deviation():
    assert bm.spread([0.5]) == {"mean": 0.5, "std": None, "min": 0.5, "max": 0.5, "n": 1}


# ----------------------------------------------------------------------------------------------------
# budgets and the pretraining objectives behind the arms


# ----------------------------------------------------------------------------------------------------
# resumability without nnU-Net


class _FakeBenchmark(bm.Benchmark):
    def steps(self):
        return [pipeline.Step("splits", "splits", lambda p: {"fold": self.fold_of(2, 1)}, always=True)]


def test_a_second_worker_runs_the_baselines_while_the_first_pretrains(tmp_path):
    """The benchmark's real step list, each step replaced by a recorder: while another worker holds the
    pretraining, this worker plans the target and trains the scratch and stock runs; the probe and the
    pretrained runs wait for the pretraining; the report comes last."""
    import dataclasses
    import fcntl
    import threading
    import time

    settings = bm.BenchmarkSettings(pretrain=["1"], target="2", out=tmp_path / "out", raw=tmp_path,
                                    labeled=[1], seeds=2, arms=["scratch", "nnunet", "joint"])
    bench = bm.Benchmark(settings, io.StringIO())
    calls: list[str] = []
    steps = [dataclasses.replace(step, run=lambda p, key=step.key: calls.append(key))
             for step in bench.steps()]
    assert [s.key for s in steps] == ["link", "plan_stock", "prepare", "plan_pretrain", "pretrain_joint",
                                      "plan_target", "probe", "splits",
                                      *(f"finetune_{arm}_L1_s{seed}" for seed in (0, 1)
                                        for arm in ("scratch", "nnunet", "joint")), "report"]
    bench.state_folder.mkdir(parents=True)
    held = open(bench.state_folder / "pretrain_joint.lock", "a+")  # noqa: SIM115 (the other worker)
    fcntl.flock(held, fcntl.LOCK_EX)
    worker = threading.Thread(target=bench.run_steps, args=(steps,), daemon=True)
    worker.start()
    end = time.monotonic() + 20
    while "waiting for" not in bench.stream.getvalue():
        assert time.monotonic() < end and worker.is_alive()
        time.sleep(0.02)
    assert calls == ["link", "plan_stock", "prepare", "plan_pretrain", "plan_target", "splits",
                     "finetune_scratch_L1_s0", "finetune_nnunet_L1_s0", "finetune_scratch_L1_s1",
                     "finetune_nnunet_L1_s1"]
    bench.marker("pretrain_joint").write_text(json.dumps({"seconds": 1.0, "info": {}, "state": {}}))
    held.close()
    worker.join(timeout=20)
    assert not worker.is_alive()
    assert calls[10:] == ["probe", "finetune_joint_L1_s0", "finetune_joint_L1_s1", "report"]


def test_run_seeds_share_one_experiment_between_invocations(tmp_path):
    """--run-seeds: this invocation fine-tunes only the named seeds; the rest of the experiment (pretraining,
    probe, the folds of every seed in their usual order, the report over all seeds) is what a full invocation
    has, so several machines can split one experiment's runs and the report gathers them."""
    import dataclasses

    kwargs = {"pretrain": ["1"], "target": "2", "out": tmp_path / "out", "raw": tmp_path / "raw",
              "labeled": [1, 2], "seeds": 3, "arms": ["scratch", "joint"], "preset": "cpu"}
    full = bm.Benchmark(bm.BenchmarkSettings(**kwargs), io.StringIO())
    part = bm.Benchmark(bm.BenchmarkSettings(**kwargs, run_seeds=[2, 0, 2]), io.StringIO())
    assert part.settings.run_seeds == [0, 2]
    assert part.settings.record() == full.settings.record()  # the same experiment
    full_keys = [s.key for s in full.steps()]
    part_keys = [s.key for s in part.steps()]
    assert [k for k in full_keys if "_s1" not in k] == part_keys
    assert "pretrain_joint" in part_keys and "probe" in part_keys and part_keys[-1] == "report"
    assert [k for k in part_keys if k.startswith("finetune_")] == [
        f"finetune_{a}_L{k}_s{s}" for s in (0, 2) for k in (1, 2) for a in ("scratch", "joint")]

    # the folds: every seed's, in the order a full invocation registers them, whichever seeds run here
    target = part.raw / "Dataset002_T"  # the folder's linked target
    (target / "labelsTr").mkdir(parents=True)
    (target / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "organ": 1},
                                                     "file_ending": ".nii.gz"}))
    for i in range(6):
        (target / "labelsTr" / f"c{i}.nii.gz").write_bytes(b"")
    for bench in (part, full):
        bench.target_name = target.name
    folds = part.step_splits(None)["folds"]
    assert list(folds) == [f"L{k}_s{s}" for s in range(3) for k in (1, 2)]
    assert folds["L2_s1"] == bm.benchmark_split([f"c{i}" for i in range(6)], 2, 1, 1)
    assert full.step_splits(None)["folds"] == folds

    # the report: the planned runs of every seed, with the runs another invocation finished in the folder
    part.state_folder.mkdir(parents=True, exist_ok=True)
    part.marker("finetune_scratch_L1_s1").write_text(json.dumps(
        {"info": {"mean_dice": 0.5, "dice": {"t": {"1": 0.5}}}}))
    report = part.collect()
    assert report["planned_runs"] == 12 and report["finished_runs"] == 1
    assert report["runs"]["scratch/L1_s1"]["mean_dice"] == 0.5

    for bad, shown in (([3], "--run-seeds 3: --seeds 3 defines seeds 0-2"), ([], "--run-seeds (empty)"),
                       ([0, -1], "--run-seeds -1:")):
        with pytest.raises(NnsslJointError, match=re.escape(shown)):
            bm.BenchmarkSettings(**kwargs, run_seeds=bad)
    assert bm.parse_seed_list("4, 2,2") == [2, 4]
    with pytest.raises(NnsslJointError, match="--run-seeds '2-4': expected comma-separated seeds"):
        bm.parse_seed_list("2-4")
    assert dataclasses.replace(part.settings, run_seeds=None).run_seeds is None
    import argparse

    parser = argparse.ArgumentParser()
    bm.add_arguments(parser)
    common = ["--target", "2", "--raw", str(tmp_path / "raw"), "--arms", "scratch", "--seeds", "3",
              "--out", str(tmp_path / "out")]
    assert bm.settings_from_args(parser.parse_args([*common, "--run-seeds", "2,0"])).run_seeds == [0, 2]
    assert bm.settings_from_args(parser.parse_args(common)).run_seeds is None


def test_settings_may_grow_but_not_change(tmp_path):
    kwargs = {"pretrain": ["1"], "target": "2", "out": tmp_path / "out", "raw": tmp_path, "labeled": [1]}
    first = _FakeBenchmark(bm.BenchmarkSettings(**kwargs, seeds=1), io.StringIO())
    first.check_settings()
    assert first.fold_of(1, 0) == 0 and first.fold_of(2, 0) == 1
    grown = _FakeBenchmark(bm.BenchmarkSettings(**{**kwargs, "labeled": [1, 2, 4]}, seeds=5,
                                                arms=["scratch"]),
                           io.StringIO())
    grown.check_settings()  # more seeds, counts, fewer arms: the same experiment
    assert grown.fold_of(4, 3) == 2 and grown.fold_of(1, 0) == 0 and grown.fold_of(2, 0) == 1
    other = _FakeBenchmark(bm.BenchmarkSettings(**kwargs, budget="tiny"), io.StringIO())
    with pytest.raises(NnsslJointError, match="differences: budget"):
        other.check_settings()


def test_the_default_preset_on_cpu_is_nnunets_own_topology_and_is_recorded(tmp_path):
    kwargs = {"pretrain": [], "target": "2", "out": tmp_path, "raw": tmp_path, "labeled": [1],
              "arms": ["scratch"]}
    default = bm.BenchmarkSettings(**kwargs)
    assert default.preset == "nnunet" and default.record()["preset"] == "nnunet"
    assert _FakeBenchmark(default, io.StringIO()).needs_stock_plans  # the preset comes from nnU-Net's plans
    assert "preset" not in bm.BenchmarkSettings(**kwargs, preset="cpu").record()  # as earlier records
    assert bm.BenchmarkSettings(**kwargs, device="cuda").preset == "gpu"


def test_a_pretraining_objective_reaches_every_arm_and_is_part_of_the_experiment(tmp_path, monkeypatch):
    from nnssl_joint.experiments.budgets import read_objective_overrides
    from nnssl_joint.pretrain.config import PretrainConfig

    kwargs = {"pretrain": ["1"], "target": "2", "out": tmp_path / "out", "raw": tmp_path, "labeled": [1],
              "arms": ["scratch", "intra", "joint"]}
    dense = read_objective_overrides('{"lambda_dense": 1.0, "dense_stage": 1}')
    settings = bm.BenchmarkSettings(**kwargs, pretrain_objective=dense)
    assert settings.record()["pretrain_objective"] == dense
    assert "pretrain_objective" not in bm.BenchmarkSettings(**kwargs).record()  # earlier records continue
    bench = _FakeBenchmark(settings, io.StringIO())
    for arm in ("intra", "joint"):
        config = settings.budget_spec.pretrain_config(arm, 0, None, settings.pretrain_objective)
        objective = PretrainConfig.from_dict(config).objective
        assert objective.lambda_dense == 1.0 and objective.dense_stage == 1
    assert PretrainConfig.from_dict(settings.budget_spec.pretrain_config("intra", 0, None, dense)
                                    ).objective.lambda_inter == 0.0  # the arm's own keys stay
    bench.check_settings()
    with pytest.raises(NnsslJointError, match="differences: pretrain_objective"):
        _FakeBenchmark(bm.BenchmarkSettings(**kwargs), io.StringIO()).check_settings()
    # a volume term's weight reaches the joint arm only: 2D-only keeps every volume term at 0, and says so
    volume = {"lambda_volume_contrast": 1.0, "lambda_inter": 0.5, "lambda_dense": 1.0}
    with_volume = bm.BenchmarkSettings(**kwargs, pretrain_objective=volume)
    intra, joint = (PretrainConfig.from_dict(with_volume.budget_spec.pretrain_config(arm, 0, None, volume))
                    .objective for arm in ("intra", "joint"))
    assert (intra.lambda_volume_contrast, intra.lambda_inter, intra.lambda_dense) == (0.0, 0.0, 1.0)
    assert (joint.lambda_volume_contrast, joint.lambda_inter, joint.lambda_dense) == (1.0, 0.5, 1.0)
    assert intra.stage_at(0).active_terms == ("intra", "dense")
    stream = io.StringIO()
    with_volume.out = tmp_path / "other"
    bench = _FakeBenchmark(with_volume, stream)
    bench.run_steps = lambda steps: None
    monkeypatch.setattr(bm, "check_inputs", lambda settings: {})
    with pytest.raises(FileNotFoundError):  # stopped after the header: no report was written
        bench.run()
    assert "2D-only pretraining leaves out lambda_volume_contrast=1.0, lambda_inter=0.5" in stream.getvalue()
    # refused before anything runs: a key an arm sets, an unknown key, bad JSON, a missing file
    with pytest.raises(NnsslJointError, match="stage_a_epochs=1 contradicts arm 'staged'"):
        bm.BenchmarkSettings(**{**kwargs, "arms": ["staged"]}, pretrain_objective={"stage_a_epochs": 1})
    with pytest.raises(NnsslJointError, match="lambda_dens"):
        read_objective_overrides('{"lambda_dens": 1.0}')
    with pytest.raises(NnsslJointError, match="not valid JSON"):
        read_objective_overrides('{"lambda_dense": }')
    with pytest.raises(NnsslJointError, match="neither JSON text nor a file"):
        read_objective_overrides(str(tmp_path / "missing.json"))
    spec = tmp_path / "objective.json"
    spec.write_text(json.dumps({"lambda_dense": 0.5}))
    assert read_objective_overrides(str(spec)) == {"lambda_dense": 0.5}


def test_a_folder_of_the_budgets_with_a_warm_up_is_refused_with_the_budget_file_that_continues_it(tmp_path):
    """The built-in budgets stopped warming up the pretrained runs; a folder recorded before (small: 1 epoch)
    is not continued with the other schedule by accident, and the refusal names the --budget file that keeps
    the old one."""
    kwargs = {"pretrain": ["1"], "target": "2", "out": tmp_path / "out", "raw": tmp_path, "labeled": [1]}
    bench = _FakeBenchmark(bm.BenchmarkSettings(**kwargs), io.StringIO())
    bench.check_settings()
    record_file = bench.state_folder / "settings.json"
    record = json.loads(record_file.read_text())
    assert record["budget"]["finetune_warmup_epochs"] == 0
    record["budget"]["finetune_warmup_epochs"] = 1  # as the small budget recorded it until 2026-12-05
    record_file.write_text(json.dumps(record))
    refusal = (r"differences: budget\);.*warmed up the runs from pretrained weights \(1 epoch\(s\)\).*"
               r"choose another --out, or continue it with a --budget file that sets "
               r"\"finetune_warmup_epochs\": 1")
    with pytest.raises(NnsslJointError, match=refusal):
        _FakeBenchmark(bm.BenchmarkSettings(**kwargs), io.StringIO()).check_settings()
    old_budget = tmp_path / "warmup1.json"
    old_budget.write_text(json.dumps({"finetune_warmup_epochs": 1}))
    _FakeBenchmark(bm.BenchmarkSettings(**kwargs, budget=str(old_budget)), io.StringIO()).check_settings()


def test_fine_tuning_overrides_reach_every_plugin_arm_but_not_stock_nnunet(tmp_path):
    from nnssl_joint.experiments.budgets import read_finetune_overrides
    from nnssl_joint.finetune import FinetuneConfig

    kwargs = {"pretrain": ["1"], "target": "2", "out": tmp_path / "out", "raw": tmp_path, "labeled": [1],
              "arms": ["scratch", "nnunet", "joint"]}
    layerwise = read_finetune_overrides('{"pretrained_lr_factor": 0.1, "freeze_pretrained_epochs": 2}')
    settings = bm.BenchmarkSettings(**kwargs, finetune=layerwise)
    assert settings.record()["finetune"] == layerwise
    assert "finetune" not in bm.BenchmarkSettings(**kwargs).record()  # earlier records continue
    # the pretrained arms keep their own seed's decoder; recorded, so a folder of an earlier version (the
    # file's decoder, no key) is not continued with the other protocol by accident ...
    assert settings.record()["new_parts_init"] == "run"
    # ... and continues, with the record of that version, when --finetune asks for the file's decoder
    old = bm.BenchmarkSettings(**kwargs, finetune={"new_parts_init": "file"}).record()
    assert "new_parts_init" not in old and "finetune" not in old
    earlier = tmp_path / "earlier"
    _FakeBenchmark(bm.BenchmarkSettings(**{**kwargs, "out": earlier}, finetune={"new_parts_init": "file"}),
                   io.StringIO()).check_settings()
    with pytest.raises(NnsslJointError, match="differences: new_parts_init.*continue it with --finetune "
                                              r"'\{\"new_parts_init\": \"file\"\}'"):
        _FakeBenchmark(bm.BenchmarkSettings(**{**kwargs, "out": earlier}), io.StringIO()).check_settings()
    bench = _FakeBenchmark(settings, io.StringIO())
    for arm in ("scratch", "joint"):  # the same file for both: they differ only in their start
        recipe, overrides, name, config = bench.finetune_config_of(arm, 3)
        assert (recipe, overrides, name) == ("plugin", layerwise, "finetune_seed3_overrides")
        cfg = FinetuneConfig.from_dict(config)
        assert (cfg.pretrained_lr_factor, cfg.freeze_pretrained_epochs, cfg.seed) == (0.1, 2, 3)
        assert cfg.new_parts_init == "run"
        assert cfg.num_epochs == settings.budget_spec.finetune_epochs  # the budget's lengths stay
    _, overrides, name, config = bench.finetune_config_of("nnunet", 3)
    assert overrides == {} and name == "finetune_seed3" and "pretrained_lr_factor" not in config
    # one file name, one content: without overrides the stock arm shares the plugin arms' file (a worker
    # writing the stock arm's version must not take new_parts_init away from a plugin run beside it)
    plain = _FakeBenchmark(bm.BenchmarkSettings(**kwargs), io.StringIO())
    assert plain.finetune_config_of("nnunet", 3)[2:] == plain.finetune_config_of("joint", 3)[2:]
    assert plain.finetune_config_of("joint", 3)[3]["new_parts_init"] == "run"
    file_decoder = _FakeBenchmark(bm.BenchmarkSettings(**kwargs, finetune={"new_parts_init": "file"}),
                                  io.StringIO())
    assert FinetuneConfig.from_dict(file_decoder.finetune_config_of("joint", 3)[3]).new_parts_init == "file"
    bench.check_settings()
    with pytest.raises(NnsslJointError, match="differences: finetune"):
        _FakeBenchmark(bm.BenchmarkSettings(**kwargs), io.StringIO()).check_settings()
    # refused before anything runs: keys the budget, recipe or seeds set, unknown keys, wrong types, a
    # combination the recipe rules out
    with pytest.raises(NnsslJointError, match="'num_epochs' is set by the budget"):
        read_finetune_overrides('{"num_epochs": 5}')
    with pytest.raises(NnsslJointError, match="unknown fine-tuning key 'pretrained_lr'.*lr_factor"):
        read_finetune_overrides('{"pretrained_lr": 0.1}')
    with pytest.raises(NnsslJointError, match="--finetune.*'pretrained_lr_factor' must be a number"):
        bm.BenchmarkSettings(**kwargs, finetune={"pretrained_lr_factor": "low"})
    with pytest.raises(NnsslJointError, match="recipe 'nnunet_warmup' trains the whole network"):
        bm.BenchmarkSettings(**kwargs, recipe="nnunet_warmup", finetune={"pretrained_lr_factor": 0.1})
    # a key that needs the protocol's new_parts_init 'run' passes with it, and is refused with the file's
    shallow = bm.BenchmarkSettings(**kwargs, finetune={"pretrained_encoder_stages": 2})
    shallow_config = _FakeBenchmark(shallow, io.StringIO()).finetune_config_of("joint", 3)[3]
    assert FinetuneConfig.from_dict(shallow_config).pretrained_encoder_stages == 2
    with pytest.raises(NnsslJointError, match="pretrained_encoder_stages 2 .*needs new_parts_init 'run'"):
        bm.BenchmarkSettings(**kwargs, finetune={"pretrained_encoder_stages": 2, "new_parts_init": "file"})
    with pytest.raises(NnsslJointError, match="--finetune is not valid JSON"):
        read_finetune_overrides('{"pretrained_lr_factor": }')
    spec = tmp_path / "finetune.json"
    spec.write_text(json.dumps({"weight_decay": 1e-4}))
    assert read_finetune_overrides(str(spec)) == {"weight_decay": 1e-4}
    assert read_finetune_overrides(None) == {} and read_finetune_overrides("  ") == {}


def test_pretrained_arms_need_pretraining_data(tmp_path):
    with pytest.raises(NnsslJointError, match="--pretrain is needed"):
        bm.BenchmarkSettings(pretrain=[], target="2", out=tmp_path, raw=tmp_path, labeled=[1], arms=["joint"])
    bm.BenchmarkSettings(pretrain=[], target="2", out=tmp_path, raw=tmp_path, labeled=[1], arms=["scratch"])


# ----------------------------------------------------------------------------------------------------
# one real run: nnU-Net planning, pretraining, fine-tuning, prediction, evaluation


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("nnUNet_")}
    env["OMP_NUM_THREADS"] = env.get("OMP_NUM_THREADS", "2")
    return subprocess.run([sys.executable, "-m", "nnssl_joint.cli", "benchmark", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=1200, check=False)


@pytest.fixture(scope="module")
def benchmark_run(module_tmp_path):
    root = module_tmp_path / "benchmark"
    root.mkdir()
    raw = root / "raw"
    # a target without imagesTs (the held-out path), stored as .nrrd, that is also a pretraining source; of
    # its 2 cases one is held out for testing, so one labeled case remains and validates itself
    make_synthetic(raw, seed=5, n_3d=3, n_2d=4, n_labeled_train=2, n_labeled_test=0, ids=(621, 622, 623),
                   n_organs=2, file_ending_3d=".nrrd")
    args = ["--raw", str(raw), "--pretrain", "621", "622", "623", "--target", "623", "--labeled", "1",
            "--seeds", "1", "--arms", "scratch,nnunet,joint", "--budget", "tiny", "--val-cases", "0",
            "--test-fraction", "0.5", "--finetune", '{"freeze_pretrained_epochs": 1}',
            "--out", str(root / "out")]
    result = _cli(*args, cwd=root)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return {"root": root, "out": root / "out", "args": args, "stdout": result.stdout}


def test_benchmark_writes_a_report_with_every_run(benchmark_run):
    report_dir = benchmark_run["out"] / "report"
    report = json.loads((report_dir / "benchmark.json").read_text())
    assert report["finished_runs"] == report["planned_runs"] == 3
    assert len(report["test_cases"]) == 1
    for arm in ("scratch", "nnunet", "joint"):
        run = report["runs"][f"{arm}/L1_s0"]
        assert 0.0 <= run["mean_dice"] <= 1.0
        assert set(run["dice"]) == set(report["test_cases"])
        # --val-cases 0: the one labeled case validates itself, and the report says so
        assert len(run["train_cases"]) == 1 and run["validation_cases"] == run["train_cases"]
        assert run["validated_on_training_cases"]
    assert report["runs"]["joint/L1_s0"]["pretrained_weights"].endswith("pretrained_for_3d_fullres.pth")
    assert report["runs"]["scratch/L1_s0"]["pretrained_weights"] is None
    assert report["runs"]["nnunet/L1_s0"]["pretrained_weights"] is None
    joint = report["summary"]["joint"]["1"]
    assert "gain_vs_scratch_points" in joint and "gain_vs_nnunet_points" in joint
    assert "gain_vs_scratch_points" in report["summary"]["nnunet"]["1"]
    for figure in ("benchmark.png", "benchmark_paired.png", "benchmark_classes.png"):
        assert (report_dir / figure).stat().st_size > 10_000, figure
    markdown = (report_dir / "benchmark.md").read_text()
    assert "| joint 2D/3D pretraining |" in markdown and "## Gain over stock nnU-Net" in markdown
    assert "(the labeled cases)" in markdown and "![paired](benchmark_paired.png)" in markdown
    assert "joint    1 labeled" in benchmark_run["stdout"] and "pts vs nnunet" in benchmark_run["stdout"]


def test_fine_tuning_overrides_act_on_the_pretrained_run_only(benchmark_run):
    """--finetune '{"freeze_pretrained_epochs": 1}' (tiny budget: 2 epochs): the joint run keeps its
    pretrained parts frozen for the first epoch, the scratch run trains everything from the start, stock
    nnU-Net gets no override; the report names the override."""
    report = json.loads((benchmark_run["out"] / "report" / "benchmark.json").read_text())
    runs = report["runs"]
    logs = {arm: next(Path(runs[f"{arm}/L1_s0"]["run_folder"]).glob("training_log_*.txt")).read_text()
            for arm in ("joint", "scratch")}
    assert "learning rate x 1, frozen for 1 epoch(s)" in logs["joint"]
    assert "pretrained parts frozen" in logs["joint"] and "pretrained parts trainable" in logs["joint"]
    assert "frozen for 0 epoch(s) (warmup_epochs, freeze_pretrained_epochs and pretrained_lr_factor act" \
        in logs["scratch"]
    assert "pretrained parts frozen" not in logs["scratch"]
    # the benchmark's protocol: the pretrained run keeps its own seed's decoder (the scratch run's)
    assert ("tensors outside the transferred parts keep this run's own initialisation (seed 0)"
            in logs["joint"])
    assert "keep this run's own initialisation" not in logs["scratch"]
    assert runs["joint/L1_s0"]["finetune_overrides"] == {"freeze_pretrained_epochs": 1}
    assert runs["nnunet/L1_s0"]["finetune_overrides"] == {}
    markdown = (benchmark_run["out"] / "report" / "benchmark.md").read_text()
    assert 'Fine-tuning overrides (plugin networks) {"freeze_pretrained_epochs": 1}.' in markdown


def test_the_nnunet_arm_is_stock_nnunet_plans_and_network(benchmark_run):
    run = json.loads((benchmark_run["out"] / "report" / "benchmark.json").read_text())["runs"]["nnunet/L1_s0"]
    folder = Path(run["run_folder"])
    assert folder.parent.name == "nnUNetTrainerBudget__nnUNetPlans__3d_fullres"
    plans = json.loads((folder.parent / "plans.json").read_text())
    assert plans["plans_name"] == "nnUNetPlans"
    network = plans["configurations"]["3d_fullres"]["architecture"]["network_class_name"]
    assert network == "dynamic_network_architectures.architectures.unet.PlainConvUNet" == run["network_class"]
    checkpoint = torch.load(folder / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert checkpoint["trainer_name"] == "nnUNetTrainerBudget" and checkpoint["current_epoch"] == 2
    assert any(k.startswith("decoder.encoder.") for k in checkpoint["network_weights"])  # stock PlainConvUNet
    log = next(folder.glob("training_log_*.txt")).read_text()
    assert '"num_epochs": 2' in log and '"seed": 0' in log  # the budget and seed of the other arms
    # the plugin's arms were planned by the plugin's planner
    plugin = json.loads((Path(json.loads((benchmark_run["out"] / "report" / "benchmark.json").read_text())
                              ["runs"]["scratch/L1_s0"]["run_folder"]).parent / "plans.json").read_text())
    assert plugin["plans_name"] == "nnsslJointPlans"


def test_test_cases_never_enter_pretraining_or_fine_tuning(benchmark_run):
    out = benchmark_run["out"]
    report = json.loads((out / "report" / "benchmark.json").read_text())
    test = set(report["test_cases"])
    assert test
    target = out / "preprocessed" / "Dataset623_SynthOrgans"
    splits = json.loads((target / "splits_final.json").read_text())
    assert not test & {c for s in splits for c in s["train"] + s["val"]}
    preprocessed_cases = {p.name.split(".")[0] for p in (target / "nnsslJointPlans_3d_fullres").iterdir()}
    assert preprocessed_cases and not test & {c.removesuffix("_seg") for c in preprocessed_cases}
    provenance = json.loads((out / "raw" / "Dataset900_BenchmarkPretrain" / "provenance.json").read_text())
    sources = {(v["source_dataset"], v["source_case"]) for v in provenance["cases"].values()}
    assert any(d.startswith("Dataset623") for d, _ in sources)  # the target's training pool is used ...
    assert not {c for d, c in sources if d.startswith("Dataset623")} & test  # ... its test cases are not


def test_rerun_skips_everything_and_a_deleted_run_repeats_exactly(benchmark_run):
    out = benchmark_run["out"]
    before = json.loads((out / "report" / "benchmark.json").read_text())
    again = _cli(*benchmark_run["args"], cwd=benchmark_run["root"])
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("skipped") >= 5
    # the fine-tuning is seeded: training the scratch run again gives the same Dice
    (out / ".benchmark" / "finetune_scratch_L1_s0.done.json").unlink()
    import shutil

    shutil.rmtree(out / "results" / "finetune_scratch")
    third = _cli(*benchmark_run["args"], cwd=benchmark_run["root"])
    assert third.returncode == 0, third.stderr[-3000:]
    after = json.loads((out / "report" / "benchmark.json").read_text())
    assert after["runs"]["scratch/L1_s0"]["dice"] == before["runs"]["scratch/L1_s0"]["dice"]
    assert after["summary"] == before["summary"]


def test_a_heldout_read_out_joins_a_finished_folder_and_scores_the_heldout_labels(benchmark_run):
    """--heldout is no part of the experiment: the finished folder continues with it and only the read-out
    runs. The held-out dataset (imagesTr/labelsTr only) holds the target's test image twice: 'same' with its
    label, 'swapped' with the two organ labels exchanged. 'same' scores exactly as the test case; 'swapped'
    scores the (same) prediction against its own label, so the evaluation reads the held-out labels."""
    import shutil

    out, root = benchmark_run["out"], benchmark_run["root"]
    before = json.loads((out / "report" / "benchmark.json").read_text())
    case = before["test_cases"][0]
    target, held = root / "raw" / "Dataset623_SynthOrgans", root / "raw" / "Dataset624_HeldOut"
    image, label = target / "imagesTr" / f"{case}_0000.nrrd", target / "labelsTr" / f"{case}.nrrd"
    reference = sitk.ReadImage(str(label))
    array = sitk.GetArrayFromImage(reference)
    assert {1, 2} <= set(np.unique(array).tolist())
    swapped = np.where(array == 1, 2, np.where(array == 2, 1, array)).astype(array.dtype)
    (held / "imagesTr").mkdir(parents=True)
    (held / "labelsTr").mkdir()
    for name in ("same", "swapped"):
        shutil.copy(image, held / "imagesTr" / f"{name}_0000.nrrd")
    shutil.copy(label, held / "labelsTr" / "same.nrrd")
    swapped_image = sitk.GetImageFromArray(swapped)
    swapped_image.CopyInformation(reference)
    sitk.WriteImage(swapped_image, str(held / "labelsTr" / "swapped.nrrd"))
    (held / "dataset.json").write_text((target / "dataset.json").read_text())

    result = _cli(*benchmark_run["args"], "--heldout", "624", cwd=root)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for arm in ("scratch", "nnunet", "joint"):  # nothing trained again
        assert f"fine-tuning {arm} + predicting + evaluating: done in an earlier run" in result.stdout
    report = json.loads((out / "report" / "benchmark.json").read_text())
    assert report["runs"] == before["runs"] and report["summary"] == before["summary"]
    read_out = report["heldout"]["Dataset624_HeldOut"]
    assert read_out["cases"] == 2 and read_out["test_source"] == "all of imagesTr/labelsTr"
    assert read_out["finished_runs"] == read_out["planned_runs"] == 3
    for arm in ("scratch", "nnunet", "joint"):
        run = read_out["runs"][f"{arm}/L1_s0"]
        assert set(run["dice"]) == {"same", "swapped"}
        assert run["dice"]["same"] == report["runs"][f"{arm}/L1_s0"]["dice"][case]
        predictions = out / "predictions_heldout" / "Dataset624_HeldOut" / arm / "L1_s0"
        prediction = pipeline.read_label(predictions / "swapped.nrrd")
        assert np.array_equal(prediction, pipeline.read_label(predictions / "same.nrrd"))
        expected = pipeline.dice_per_class(prediction, swapped, [1, 2])
        assert run["dice"]["swapped"] == {str(c): None if np.isnan(v) else pytest.approx(v)
                                          for c, v in expected.items()}
        assert read_out["summary"][arm]["1"]["dice"]["mean"] == pytest.approx(run["mean_dice"])
    assert "gain_vs_scratch_points" in read_out["summary"]["joint"]["1"]
    markdown = (out / "report" / "benchmark.md").read_text()
    section = markdown.split("## Held-out read-out: Dataset624_HeldOut (2 cases; nothing trains or tunes on "
                             "them)")[1].split("\n## ")[0]
    assert "| joint 2D/3D pretraining |" in section and "| from scratch |" in section
    assert "### Gain over stock nnU-Net" in section and "| joint | 1 | 0 |" in section
    assert "Held-out read-out Dataset624_HeldOut (2 cases; 3/3 runs):" in result.stdout

    # a run trained again (its marker and results deleted, here without --heldout) loses its held-out
    # read-out, which scored the earlier checkpoint; the next --heldout invocation reads the new one out
    shutil.rmtree(out / "results" / "finetune_scratch")
    (out / ".benchmark" / "finetune_scratch_L1_s0.done.json").unlink()
    retrained = _cli(*benchmark_run["args"], cwd=root)
    assert retrained.returncode == 0, retrained.stdout[-3000:] + retrained.stderr[-3000:]
    assert not (out / ".benchmark" / "heldout_Dataset624_HeldOut_scratch_L1_s0.done.json").exists()
    assert (out / ".benchmark" / "heldout_Dataset624_HeldOut_joint_L1_s0.done.json").is_file()
    again = _cli(*benchmark_run["args"], "--heldout", "624", cwd=root)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "scratch predicting + evaluating held-out Dataset624_HeldOut: done in an earlier run" \
        not in again.stdout
    assert "joint predicting + evaluating held-out Dataset624_HeldOut: done in an earlier run" in again.stdout
    assert json.loads((out / "report" / "benchmark.json").read_text())["heldout"]["Dataset624_HeldOut"][
        "finished_runs"] == 3


# ----------------------------------------------------------------------------------------------------
# every constraint on the datasets and the split is checked before anything is merged, planned or trained


@pytest.fixture(scope="module")
def check_raw(module_tmp_path):
    raw = module_tmp_path / "checks" / "raw"
    make_synthetic(raw, seed=3, n_3d=2, n_2d=2, n_labeled_train=3, n_labeled_test=2, ids=(631, 632, 633),
                   n_organs=2, shape_3d=(16, 32, 32))
    flat = raw / "Dataset640_Flat"
    for split, cases in (("Tr", 3), ("Ts", 1)):
        for i in range(cases):
            image = (np.random.default_rng(i).random((32, 32)) * 255).astype(np.uint8)
            (flat / f"images{split}").mkdir(parents=True, exist_ok=True)
            (flat / f"labels{split}").mkdir(parents=True, exist_ok=True)
            sitk.WriteImage(sitk.GetImageFromArray(image),
                            str(flat / f"images{split}" / f"f{split}{i}_0000.png"))
            sitk.WriteImage(sitk.GetImageFromArray((image > 128).astype(np.uint8)),
                            str(flat / f"labels{split}" / f"f{split}{i}.png"))
    (flat / "dataset.json").write_text(json.dumps({"channel_names": {"0": "gray"},
                                                   "labels": {"background": 0, "a": 1},
                                                   "numTraining": 3, "file_ending": ".png"}))
    return raw


def _copy_target(raw: Path, new_id: int) -> Path:
    import shutil

    source = next(raw.glob("Dataset633_*"))
    destination = raw / f"Dataset{new_id}_Broken"
    if destination.exists():
        shutil.rmtree(destination)
    shutil.copytree(source, destination)
    return destination


def _broken_missing_test_image(raw: Path) -> str:
    target = _copy_target(raw, 641)
    next((target / "imagesTs").iterdir()).unlink()
    return "641"


def _broken_label_value(raw: Path) -> str:
    target = _copy_target(raw, 642)
    for label in (target / "labelsTr").iterdir():
        image = sitk.ReadImage(str(label))
        array = sitk.GetArrayFromImage(image)
        array[0, 0, 0] = 9
        out = sitk.GetImageFromArray(array)
        out.CopyInformation(image)
        sitk.WriteImage(out, str(label))
    return "642"


def _broken_channels(raw: Path) -> str:
    target = _copy_target(raw, 643)
    dataset_json = json.loads((target / "dataset.json").read_text())
    dataset_json["channel_names"] = {"0": "T1", "1": "T2"}
    (target / "dataset.json").write_text(json.dumps(dataset_json))
    return "643"


@pytest.mark.parametrize("case, flags, match", [
    ("pool too small", {"labeled": [3], "val_cases": 1}, r"need 4 cases.*has 3.*--val-cases, 0 validates"),
    ("missing pretraining dataset", {"pretrain": ["699"], "arms": ["scratch", "joint"]}, "699"),
    ("test image missing", {"target": _broken_missing_test_image}, "images are missing in"),
    ("undeclared label value", {"target": _broken_label_value},
     r"label value\(s\) \[9\].*add them to 'labels'"),
    ("channel files missing", {"target": _broken_channels}, "channel"),
    ("2D target, 3D configuration", {"target": "640"}, "holds 2D images.*-c 2d"),
])
def test_every_early_check_fires_in_seconds_before_anything_is_written(check_raw, tmp_path, case, flags,
                                                                       match):
    import time

    flags = dict(flags)
    if callable(flags.get("target")):
        flags["target"] = flags["target"](check_raw)
    settings = bm.BenchmarkSettings(**{"pretrain": ["631", "632"], "target": "633", "out": tmp_path / "out",
                                       "raw": check_raw, "labeled": [1], "seeds": 2, "arms": ["scratch"],
                                       "budget": "tiny", **flags})
    start = time.monotonic()
    with pytest.raises(NnsslJointError, match=match):
        bm.Benchmark(settings, io.StringIO()).run()
    assert time.monotonic() - start < 10, case
    assert not (tmp_path / "out" / "raw").exists() and not (tmp_path / "out" / ".benchmark").exists()


def test_the_checks_pass_for_a_one_case_target_validating_on_itself(check_raw, tmp_path):
    settings = bm.BenchmarkSettings(pretrain=["631"], target="633", out=tmp_path, raw=check_raw,
                                    labeled=[1, 3], seeds=3, val_cases=0, arms=["scratch", "nnunet", "joint"])
    checked = bm.check_inputs(settings)
    assert checked["training_pool"] == 3 and checked["test_cases"] == 2 and not checked["2d"]
    with pytest.raises(NnsslJointError, match="--pretrain is needed"):
        bm.BenchmarkSettings(pretrain=[], target="633", out=tmp_path, raw=check_raw, labeled=[1],
                             arms=["nnunet", "intra"])
    bm.BenchmarkSettings(pretrain=[], target="633", out=tmp_path, raw=check_raw, labeled=[1], arms=["nnunet"])


# ----------------------------------------------------------------------------------------------------
# the held-out read-out (--heldout): a read-out, checked before anything runs, waiting for its fine-tuning


def test_heldout_is_a_read_out_not_part_of_the_experiment(tmp_path):
    """A folder made without --heldout continues with it (and one made with it, without it)."""
    import argparse

    kwargs = {"pretrain": [], "target": "2", "out": tmp_path / "out", "raw": tmp_path, "labeled": [1],
              "arms": ["scratch"]}
    plain = bm.BenchmarkSettings(**kwargs)
    with_heldout = bm.BenchmarkSettings(**kwargs, heldout=["7", "8", "7"])
    assert with_heldout.heldout == ["7", "8"] and with_heldout.record() == plain.record()
    assert "heldout" not in json.dumps(with_heldout.record())
    _FakeBenchmark(plain, io.StringIO()).check_settings()
    _FakeBenchmark(with_heldout, io.StringIO()).check_settings()  # the same experiment
    parser = argparse.ArgumentParser()
    bm.add_arguments(parser)
    args = parser.parse_args(["--target", "2", "--raw", str(tmp_path), "--arms", "scratch",
                              "--heldout", "7", "8", "--heldout", "Dataset009_X"])
    assert bm.settings_from_args(args).heldout == ["7", "8", "Dataset009_X"]
    assert parser.parse_args(["--target", "2"]).heldout == []
    with pytest.raises(SystemExit):  # --heldout names at least one dataset
        parser.parse_args(["--target", "2", "--heldout"])


def test_an_arm_pretrained_by_a_later_invocation_is_probed_with_the_earlier_ones(tmp_path):
    """--arms intra first, then --arms joint into the same folder: the probe's marker (intra only) is
    dropped, so the probe runs again over both arms; once it holds both, it stays done."""
    kwargs = {"pretrain": ["1"], "target": "2", "out": tmp_path / "out", "raw": tmp_path, "labeled": [1]}
    later = bm.Benchmark(bm.BenchmarkSettings(**kwargs, arms=["joint"]), stream := io.StringIO())
    later.state_folder.mkdir(parents=True)
    for key in ("pretrain_intra", "pretrain_joint"):
        later.marker(key).write_text(json.dumps({"seconds": 1, "info": {}}))
    assert later.probe_arms() == ["intra", "joint"]
    probed_intra = {"seconds": 1, "info": {"weights": [{"name": bm.ARM_LABELS["intra"]}]}}
    later.marker("probe").write_text(json.dumps(probed_intra))
    later.forget_stale_probe()
    assert not later.marker("probe").exists() and "arm(s) joint not probed yet" in stream.getvalue()
    both = {"seconds": 1, "info": {"weights": [{"name": bm.ARM_LABELS[a]} for a in ("intra", "joint")]}}
    later.marker("probe").write_text(json.dumps(both))
    later.forget_stale_probe()
    assert later.marker("probe").exists()
    # an invocation with the earlier arm only keeps a marker that covers it
    earlier = bm.Benchmark(bm.BenchmarkSettings(**kwargs, arms=["intra"]), io.StringIO())
    earlier.marker("pretrain_joint").unlink()
    earlier.marker("probe").write_text(json.dumps(probed_intra))
    assert earlier.probe_arms() == ["intra"]
    earlier.forget_stale_probe()
    assert earlier.marker("probe").exists()


def _heldout_copy(raw: Path, new_id: int, change=None) -> str:
    """A copy of the labeled target 633 (imagesTs/labelsTs: 2 cases) as Dataset<new_id>_Held, changed by
    ``change(folder, dataset_json)``."""
    import shutil

    destination = raw / f"Dataset{new_id}_Held"
    if destination.exists():
        shutil.rmtree(destination)
    shutil.copytree(next(raw.glob("Dataset633_*")), destination)
    dataset_json = json.loads((destination / "dataset.json").read_text())
    if change is not None:
        change(destination, dataset_json)
    (destination / "dataset.json").write_text(json.dumps(dataset_json))
    return str(new_id)


def _renamed_label(folder, dataset_json):
    dataset_json["labels"] = {("tumour" if v == 2 else k): v for k, v in dataset_json["labels"].items()}


def _two_channels(folder, dataset_json):
    dataset_json["channel_names"] = {"0": "T1", "1": "T2"}


def _one_image_missing(folder, dataset_json):
    next((folder / "imagesTs").iterdir()).unlink()


def _no_labels(folder, dataset_json):
    import shutil

    shutil.rmtree(folder / "labelsTs")
    shutil.rmtree(folder / "labelsTr")


def _flat_first_image(folder, dataset_json):
    first = min((folder / "imagesTs").iterdir())
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((32, 32), np.float32)), str(first))


@pytest.mark.parametrize("case, heldout, match", [
    ("not found", lambda raw: "698", "No dataset with id 698"),
    ("the target itself", lambda raw: "633", "--heldout 633 is the target Dataset633_SynthOrgans itself"),
    ("a pretraining source", lambda raw: "631", r"--heldout 631 \(Dataset631_\w+\) is one of the --pretrain"),
    ("other labels", lambda raw: _heldout_copy(raw, 651, _renamed_label),
     r"Dataset651_Held/dataset.json: labels .*tumour.* differ from .* of the target .*Dataset633"),
    ("other file ending", lambda raw: _heldout_copy(raw, 652, lambda f, d: d.update(file_ending=".nrrd")),
     r"Dataset652_Held/dataset.json: file_ending '.nrrd' differs from the target's '.nii.gz'"),
    ("other channels", lambda raw: _heldout_copy(raw, 653, _two_channels),
     r"Dataset653_Held/dataset.json: 2 channel\(s\).*target has 1"),
    ("a label without its image", lambda raw: _heldout_copy(raw, 654, _one_image_missing),
     r"--heldout Dataset654_Held: .*labelsTs has labels whose images"),
    ("no labeled case", lambda raw: _heldout_copy(raw, 655, _no_labels),
     r"--heldout Dataset655_Held has no labeled case.*labelsTr"),
    ("2D images for a 3D target", lambda raw: _heldout_copy(raw, 656, _flat_first_image),
     r"--heldout Dataset656_Held holds 2D images"),
])
def test_every_heldout_refusal_fires_before_anything_is_written(check_raw, tmp_path, case, heldout, match):
    settings = bm.BenchmarkSettings(pretrain=["631", "632"], target="633", out=tmp_path / "out",
                                    raw=check_raw, labeled=[1], seeds=1, arms=["scratch"], budget="tiny",
                                    heldout=[heldout(check_raw)])
    with pytest.raises(NnsslJointError, match=match):
        bm.Benchmark(settings, io.StringIO()).run()
    assert not (tmp_path / "out" / "raw").exists() and not (tmp_path / "out" / ".benchmark").exists()


def test_heldout_cases_are_its_test_split_or_else_all_its_training_cases(check_raw, tmp_path):
    settings = bm.BenchmarkSettings(pretrain=["631"], target="633", out=tmp_path, raw=check_raw, labeled=[1],
                                    seeds=1, arms=["scratch"], heldout=[_heldout_copy(check_raw, 657)])
    assert bm.check_inputs(settings)["heldout_cases"] == {"Dataset657_Held": 2}  # imagesTs/labelsTs
    held = bm.read_heldout_set(check_raw / "Dataset657_Held")
    assert held.own_test and sorted(held.labels) == sorted(
        p.name.removesuffix(".nii.gz") for p in (check_raw / "Dataset657_Held" / "labelsTs").iterdir())
    import shutil

    shutil.rmtree(check_raw / "Dataset657_Held" / "labelsTs")  # no test split: every training case
    held = bm.read_heldout_set(check_raw / "Dataset657_Held")
    assert not held.own_test and held.test_source == "all of imagesTr/labelsTr" and len(held.labels) == 3
    bm.link_heldout_set(held, tmp_path / "linked")
    assert sorted(p.name for p in (tmp_path / "linked" / "labelsTs").iterdir()) == sorted(
        f"{c}.nii.gz" for c in held.labels)
    assert all(p.is_symlink() for p in (tmp_path / "linked" / "imagesTs").iterdir())


def test_a_heldout_step_waits_for_its_fine_tuning_and_names_a_run_that_never_finished(tmp_path, monkeypatch):
    """Without training: the fine-tuning marker is missing (error naming the run), or another worker holds
    the fine-tuning's lock (the step waits, then predicts with that run's checkpoint and scores the held-out
    labels)."""
    import dataclasses
    import fcntl
    import threading
    import time

    (tmp_path / "raw" / "Dataset660_Held").mkdir(parents=True)
    settings = bm.BenchmarkSettings(pretrain=[], target="2", out=tmp_path / "out", raw=tmp_path / "raw",
                                    labeled=[1], seeds=1, arms=["scratch"], heldout=["660"])
    stream = io.StringIO()
    bench = bm.Benchmark(settings, stream)
    bench.target_name, bench.target_id = "Dataset002_T", 2
    target = bench.raw / bench.target_name
    target.mkdir(parents=True)
    (target / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "a": 1, "b": 2},
                                                     "file_ending": ".nii.gz", "channel_names": {"0": "x"}}))
    labels = bench.heldout_folder("Dataset660_Held") / "labelsTs"
    labels.mkdir(parents=True)
    for case, value in (("h0", 1), ("h1", 2)):
        array = np.zeros((4, 4, 4), np.uint8)
        array[1:3, 1:3, 1:3] = value
        sitk.WriteImage(sitk.GetImageFromArray(array), str(labels / f"{case}.nii.gz"))
    commands = []

    def predict(cmd, env, log_name, progress=None):  # a "prediction" of label 1 everywhere in the cube
        commands.append(cmd)
        out = Path(cmd[cmd.index("-o") + 1])
        out.mkdir(parents=True)
        for label in labels.iterdir():
            array = (sitk.GetArrayFromImage(sitk.ReadImage(str(label))) > 0).astype(np.uint8)
            sitk.WriteImage(sitk.GetImageFromArray(array), str(out / label.name))

    monkeypatch.setattr(bench, "run_command", predict)
    monkeypatch.setattr(bench, "write_report", dict)
    progress = pipeline.StepProgress(1, 1, "held-out", stream)
    with pytest.raises(NnsslJointError, match=r"the run scratch_L1_s0 has no finished fine-tuning \(no .*"
                                              r"finetune_scratch_L1_s0.done.json\)"):
        bench.step_heldout("Dataset660_Held", "scratch", 1, 0, progress)
    assert not commands

    run_folder = tmp_path / "out" / "results" / "fold_3"
    run_folder.mkdir(parents=True)
    (run_folder / "checkpoint_final.pth").write_bytes(b"")
    lock = open(bench.state_folder / "finetune_scratch_L1_s0.lock", "a+")  # noqa: SIM115
    fcntl.flock(lock, fcntl.LOCK_EX)  # another worker is fine-tuning the run
    lock.write("process 4242 on another host")
    lock.flush()
    results = []
    worker = threading.Thread(target=lambda: results.append(
        bench.step_heldout("Dataset660_Held", "scratch", 1, 0, progress)))
    worker.start()
    time.sleep(0.5)
    assert worker.is_alive() and not commands  # waiting, not predicting
    bench.marker("finetune_scratch_L1_s0").write_text(json.dumps(
        {"info": {"run_folder": str(run_folder), "fold": 3, "mean_dice": 0.9, "dice": {"t": {"1": 0.9}}}}))
    lock.close()  # the fine-tuning finished
    worker.join(timeout=30)
    assert not worker.is_alive() and results
    assert "waiting for process 4242 on another host to finish finetune_scratch_L1_s0" in stream.getvalue()
    cmd = commands[0]
    assert cmd[cmd.index("-i") + 1] == str(bench.heldout_folder("Dataset660_Held") / "imagesTs")
    assert cmd[cmd.index("-f") + 1] == "3" and cmd[cmd.index("-chk") + 1] == "checkpoint_final.pth"
    assert cmd[cmd.index("-o") + 1] == str(tmp_path / "out" / "predictions_heldout" / "Dataset660_Held"
                                           / "scratch" / "L1_s0")
    result = results[0]
    # h0 (class 1): the prediction is right; h1 (class 2): label 1 predicted where 2 is
    assert result["dice"]["h0"] == {"1": 1.0, "2": pytest.approx(float("nan"), nan_ok=True)}
    assert result["dice"]["h1"] == {"1": 0.0, "2": 0.0}
    assert result["mean_dice"] == pytest.approx(0.5)

    # the report: the read-out of every linked held-out dataset, also in an invocation without --heldout
    marker = bench.marker(bench.heldout_key("Dataset660_Held", "scratch", 1, 0))
    marker.write_text(json.dumps({"info": result}))
    bench.marker("link_heldout_Dataset660_Held").write_text(json.dumps(
        {"info": {"cases": ["h0", "h1"], "test_source": "imagesTs/labelsTs", "source": "x"}}))
    for heldout in (["660"], []):
        later = bm.Benchmark(dataclasses.replace(settings, heldout=heldout), io.StringIO())
        later.target_name = bench.target_name
        read_out = later.collect()["heldout"]["Dataset660_Held"]
        assert read_out["cases"] == 2 and read_out["finished_runs"] == read_out["planned_runs"] == 1
        assert read_out["summary"]["scratch"]["1"]["dice"]["mean"] == pytest.approx(0.5)
        assert read_out["runs"]["scratch/L1_s0"]["dice"]["h1"] == {"1": 0.0, "2": 0.0}


def test_pretraining_options_reach_every_arm_are_part_of_the_experiment_and_bad_ones_are_refused(tmp_path):
    from nnssl_joint.experiments.budgets import read_pretrain_options
    from nnssl_joint.pretrain.config import PretrainConfig

    kwargs = {"pretrain": ["1"], "target": "2", "out": tmp_path / "out", "raw": tmp_path, "labeled": [1],
              "arms": ["scratch", "intra", "joint"]}
    options = read_pretrain_options('{"data": {"batch_size_3d": 8}, '
                                    '"optim": {"grad_clip_mode": "per_part", "volume_lr_factor": 0.1}}')
    settings = bm.BenchmarkSettings(**kwargs, pretrain_options=options)
    assert settings.record()["pretrain_options"] == options
    assert "pretrain_options" not in bm.BenchmarkSettings(**kwargs).record()  # earlier records continue
    for arm in ("intra", "joint"):
        config = PretrainConfig.from_dict(settings.budget_spec.pretrain_config(arm, 0, None, None, options))
        assert config.data.batch_size_3d == 8
        assert config.optim.grad_clip_mode == "per_part" and config.optim.volume_lr_factor == 0.1
        # the budget's lengths stay the budget's
        assert config.optim.num_epochs == settings.budget_spec.pretrain_epochs
        assert config.optim.iterations_per_epoch == settings.budget_spec.pretrain_iterations
    _FakeBenchmark(settings, io.StringIO()).check_settings()
    with pytest.raises(NnsslJointError, match="differences: pretrain_options"):  # the same folder, no options
        _FakeBenchmark(bm.BenchmarkSettings(**kwargs), io.StringIO()).check_settings()
    # refused before anything runs, each naming the key and where it belongs
    with pytest.raises(NnsslJointError, match="optim.num_epochs is set by the budget"):
        read_pretrain_options('{"optim": {"num_epochs": 3}}')
    with pytest.raises(NnsslJointError, match="'objective' is set with --pretrain-objective"):
        read_pretrain_options('{"objective": {"lambda_inter": 0}}')
    with pytest.raises(NnsslJointError, match="unknown section 'optm'"):
        read_pretrain_options('{"optm": {"lr": 0.1}}')
    with pytest.raises(NnsslJointError, match="grad_clip_mode"):
        read_pretrain_options('{"optim": {"grad_clip_mode": "parts"}}')
    with pytest.raises(NnsslJointError, match="batch_size_3e"):
        read_pretrain_options('{"data": {"batch_size_3e": 8}}')
    with pytest.raises(NnsslJointError, match="--pretrain-options"):
        bm.BenchmarkSettings(**kwargs, pretrain_options={"optim": {"save_every": 2}})


def test_init_from_in_the_pretraining_options_starts_every_arm_from_the_file(tmp_path, monkeypatch):
    from nnssl_joint.experiments.budgets import read_pretrain_options
    from nnssl_joint.pretrain.config import PretrainConfig

    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "checkpoint_final.pth").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    options = read_pretrain_options('{"init_from": "runs/checkpoint_final.pth", '
                                    '"data": {"batch_size_3d": 8}}')
    absolute = str(tmp_path / "runs" / "checkpoint_final.pth")
    assert options["init_from"] == absolute  # the pretraining runs in another working directory
    settings = bm.BenchmarkSettings(pretrain=["1"], target="2", out=tmp_path / "out", raw=tmp_path,
                                    labeled=[1], arms=["scratch", "intra", "joint"], pretrain_options=options)
    assert settings.record()["pretrain_options"]["init_from"] == absolute
    for arm in ("intra", "joint"):
        config = PretrainConfig.from_dict(settings.budget_spec.pretrain_config(arm, 0, None, None, options))
        assert config.init_from == absolute and config.data.batch_size_3d == 8
    with pytest.raises(NnsslJointError, match=r"init_from 'runs/missing\.pth' is not a file"):
        read_pretrain_options('{"init_from": "runs/missing.pth"}')
