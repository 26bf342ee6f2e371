"""End to end: a generated labeled target planned with the plugin's planner, a pretraining checkpoint
built in-process in the trainer's format, and every kind of weights through ``nnssl_joint probe``."""

from __future__ import annotations

import io
import json
import math
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from nnssl_joint.cli import main as cli_main
from nnssl_joint.errors import NnsslJointError
from nnssl_joint.export import export_for_presets
from nnssl_joint.models.preset import ArchitecturePreset, load_preset
from nnssl_joint.pretrain.autoconfig import SelfConfiguration
from nnssl_joint.pretrain.model import JointSSLModel
from nnssl_joint.probe.readout import ReadoutSettings
from nnssl_joint.probe.run import bootstrap_difference, report_section, run_probe
from nnssl_joint.ssl.objective import ObjectiveConfig

RUN = Path("JointSSLPretrainTrainer__nnsslJointPlans__joint_ssl") / "fold_all"
FAST = ReadoutSettings(pixels_per_class=200, knn_pixels_per_class=100, lbfgs_iterations=30)
ENV = (("nnUNet_raw", "raw"), ("nnUNet_preprocessed", "pre"), ("nnUNet_results", "results"))


def save_checkpoint(folder: Path, preset: ArchitecturePreset, channels: int = 1, seed: int = 0) -> Path:
    """A checkpoint_final.pth as JointSSLPretrainTrainer writes it
    (network_weights + 'nnssl_joint' record)."""
    torch.manual_seed(seed)
    resolved = SelfConfiguration(view_size=32, small_view_size=32, n_small_views=0, n_slices=8,
                                 batch_size_2d=4, batch_size_3d=2, num_prototypes_2d=8, num_prototypes_3d=4,
                                 freeze_prototypes_iterations=1, queue_start_iteration=1,
                                 memory_budget_gb=3.0, estimated_activation_gb=0.1)
    model = JointSSLModel(preset, channels, resolved.objective(ObjectiveConfig()))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "checkpoint_final.pth"
    torch.save({"network_weights": model.state_dict(), "trainer_name": "JointSSLPretrainTrainer",
                "nnssl_joint": {"preset": preset.to_dict(),
                                "config": {"objective": ObjectiveConfig().to_dict()},
                                "input_channels": channels, "resolved": resolved.to_dict()}}, path)
    return path


@pytest.fixture(scope="module")
def workspace(module_tmp_path):
    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprint_dataset

    from nnssl_joint.datasets.synthetic import write_labeled_3d
    from nnssl_joint.planning.downstream import JointSSLDownstreamPlanner

    root = module_tmp_path / "probe"
    root.mkdir()
    env = {"nnUNet_raw": root / "raw", "nnUNet_preprocessed": root / "pre",
           "nnUNet_results": root / "results"}
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            value.mkdir()
            mp.setenv(key, str(value))
        write_labeled_3d(env["nnUNet_raw"], 503, "SynthOrgans", n_train=3, n_test=2, shape=(12, 32, 32),
                         seed=0)
        # fingerprint + plans as plan_and_preprocess --downstream writes them; the probe preprocesses its
        # cases itself with nnU-Net's preprocessor, so the preprocessed folders are not needed
        extract_fingerprint_dataset(503, num_processes=1, check_dataset_integrity=False, clean=True,
                                    verbose=False)
        JointSSLDownstreamPlanner(503).plan_experiment()
        run = root / "results" / RUN
        save_checkpoint(run, load_preset("cpu"))
        export_for_presets(run / "checkpoint_final.pth", run)
        yield root


def _numbers(report: dict) -> list:
    """Every Dice / diagnostic number of a report (times excluded)."""
    out = []
    for res in report["random_runs"] + report["weights"]:
        out.append((res["name"], res["dice"], {k: v for k, v in res["diagnostics"].items()}))
    return out


def _env(monkeypatch, workspace):
    for key, sub in ENV:
        monkeypatch.setenv(key, str(workspace / sub))


def test_cli_writes_the_report(workspace, monkeypatch, capsys):
    _env(monkeypatch, workspace)
    out = workspace / "out_cli"
    assert cli_main(["probe", "--weights", "random", "--target", "503", "--random-seeds", "1",
                     "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "random (1 seed)" in printed and "linear Dice" in printed
    report = json.loads((out / "probe.json").read_text())
    assert report["weights"] == [] and len(report["random_runs"]) == 1
    section = "\n".join(report_section(report))  # what the demo and benchmark reports embed
    assert section.startswith("## Frozen-encoder probe") and "| random (1 seed) |" in section
    assert (out / "probe.md").read_text().startswith("# Probe: Dataset503_SynthOrgans")
    assert (out / "probe.png").stat().st_size > 1000


def test_every_kind_of_weights_loads_and_reports(workspace, monkeypatch, capsys):
    _env(monkeypatch, workspace)
    run = workspace / "results" / RUN
    out = workspace / "out_all"
    report = run_probe([str(run), str(run / "checkpoint_final.pth"), str(run / "pretrained_for_2d.pth"),
                        str(run / "pretrained_for_3d_fullres.pth"), "random"], "503", random_seeds=2, out=out,
                       settings=FAST)
    assert "random (2 seeds)" in capsys.readouterr().out
    assert report["target"]["split"] == "imagesTs/labelsTs"
    assert report["target"]["fit_cases"] == ["SynthOrgans_000", "SynthOrgans_001", "SynthOrgans_002"]
    assert len(report["target"]["test_cases"]) == 2
    folder, ckpt, file_2d, file_3d = report["weights"]
    assert [len(r["dice"]["logistic"]["per_class"]) for r in report["weights"]] == [3] * 4
    # same encoder tensors -> the same dense probe, whichever file holds them
    assert folder["dice"] == ckpt["dice"] == file_2d["dice"] == file_3d["dice"]
    # diagnostics where the file has the parts: prototypes only in checkpoints, f_inter not in the 2D file
    assert ({"prototype_entropy_2d", "prototype_entropy_3d", "rankme_z", "slice_position_r2"}
            <= set(ckpt["diagnostics"]))
    assert file_2d["diagnostics"] == {}
    assert "rankme_z" in file_3d["diagnostics"] and "prototype_entropy_2d" not in file_3d["diagnostics"]
    assert file_3d["diagnostics"]["rankme_z"] == pytest.approx(ckpt["diagnostics"]["rankme_z"])
    # random: nnU-Net's SliceWiseUNet3D initialisation, different per seed, with all but the prototype
    # diagnostics
    r0, r1 = report["random_runs"]
    assert r0["source"].startswith("random") and r0["dice"] != r1["dice"]
    assert "rankme_z" in r0["diagnostics"] and "prototype_entropy_2d" not in r0["diagnostics"]
    assert report["retrieval_chance"] == pytest.approx(1 / ckpt["diagnostics"]["n_windows"]["test"])
    for res in report["weights"]:
        v = res["vs_random"]["logistic"]
        assert v["ci_low"] <= v["difference"] <= v["ci_high"]
        assert math.isfinite(res["dice"]["logistic"]["mean"])
        assert 0 < res["diagnostics"].get("rankme_slices", 1) <= 128


def test_same_seed_same_numbers_and_2d_configuration(workspace, monkeypatch):
    _env(monkeypatch, workspace)
    ckpt = workspace / "results" / RUN / "checkpoint_final.pth"
    one = run_probe([str(ckpt)], 503, "2d", fit_cases=2, random_seeds=1, seed=3, stream=io.StringIO(),
                    settings=FAST)
    two = run_probe([str(ckpt)], 503, "2d", fit_cases=2, random_seeds=1, seed=3, stream=io.StringIO(),
                    settings=FAST)
    assert _numbers(one) == _numbers(two)
    assert one["target"]["configuration"] == "2d" and len(one["target"]["fit_cases"]) == 2
    # the probe leaves the caller's random streams alone
    def draw():
        return torch.rand(3).tolist(), np.random.rand(3).tolist(), random.random()

    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    expected = draw()
    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    run_probe([str(ckpt)], 503, fit_cases=1, random_seeds=1, stream=io.StringIO(), settings=FAST)
    assert draw() == expected


def test_errors_name_the_fix(workspace, monkeypatch, tmp_path):
    from nnssl_joint.datasets.synthetic import write_unlabeled_3d

    _env(monkeypatch, workspace)
    ckpt = workspace / "results" / RUN / "checkpoint_final.pth"
    with pytest.raises(NnsslJointError,
                       match=r"--fit-cases 7 asked, but .* has 3 labeled case\(s\).*--fit-cases 3"):
        run_probe([str(ckpt)], 503, fit_cases=7, stream=io.StringIO())
    with pytest.raises(NnsslJointError, match="not labeled fit candidates"):
        run_probe([str(ckpt)], 503, fit=["case_999"], stream=io.StringIO())

    narrow = ArchitecturePreset.from_dict({**load_preset("cpu").to_dict(), "name": "narrow",
                                           "encoder": {**load_preset("cpu").to_dict()["encoder"],
                                                       "features_per_stage": [8, 16, 32, 64, 64]}})
    other = save_checkpoint(tmp_path / "narrow", narrow)
    with pytest.raises(NnsslJointError, match=r"preset 'narrow'.*--downstream --preset narrow"):
        run_probe([str(other)], 503, stream=io.StringIO())
    two_channels = save_checkpoint(tmp_path / "two", load_preset("cpu"), channels=2)
    with pytest.raises(NnsslJointError, match=r"2 input channel\(s\), target Dataset503_SynthOrgans has 1"
                                              r".*nnssl_joint export"):
        run_probe([str(two_channels)], 503, stream=io.StringIO())

    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    shutil.copy(ckpt, unfinished / "checkpoint_latest.pth")
    with pytest.raises(NnsslJointError, match=r"no checkpoint_final.pth.*--c.*checkpoint_latest.pth"):
        run_probe([str(unfinished)], 503, stream=io.StringIO())

    write_unlabeled_3d(workspace / "raw", 511, "NoLabels", n_cases=2, shape=(8, 32, 32))
    with pytest.raises(NnsslJointError, match=r"no labels .*labelsTr.*labeled task"):
        run_probe(["random"], 511, stream=io.StringIO())
    with pytest.raises(NnsslJointError, match=r"plan_and_preprocess -d 503 --downstream"):
        monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "empty"))
        run_probe(["random"], 503, stream=io.StringIO())


def test_bootstrap_interval_covers_a_known_difference():
    rng = np.random.default_rng(0)
    random_cases = 0.3 + 0.01 * rng.standard_normal((5, 8))
    pretrained = random_cases.mean(0) + 0.1
    result = bootstrap_difference(pretrained, random_cases)
    assert result["difference"] == pytest.approx(0.1)
    assert result["ci_low"] < 0.1 < result["ci_high"] and result["ci_high"] - result["ci_low"] < 0.05
    same = bootstrap_difference(random_cases[0], random_cases)
    assert same["ci_low"] < 0 < same["ci_high"] or same["difference"] == 0
