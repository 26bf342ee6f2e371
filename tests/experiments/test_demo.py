"""The demo's pieces (nnssl_joint/experiments/demo.py, nnssl_joint/experiments/report.py) on small fake
inputs; the full demo runs only in the slow test at the end (``bash scripts/test.sh -m slow``)."""

from __future__ import annotations

import argparse
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnssl_joint.errors import NnsslJointError
from nnssl_joint.experiments import demo, pipeline, report
from nnssl_joint.experiments.budgets import DEMO_BUDGETS, PRETRAIN_LABELS, PRETRAIN_RUNS

# ----------------------------------------------------------------------------------------------------
# Dice and evaluation


def test_dice_per_class_known_overlap():
    reference = np.zeros((4, 4, 4), dtype=np.uint8)
    prediction = np.zeros_like(reference)
    reference[0, :2] = 1  # 8 voxels
    prediction[0, :1] = 1  # 4 voxels, all inside
    reference[2] = 2  # 16 voxels
    prediction[3] = 2  # 16 voxels, none overlapping
    scores = pipeline.dice_per_class(prediction, reference, [1, 2])
    assert scores[1] == pytest.approx(2 * 4 / (4 + 8))
    assert scores[2] == 0.0


def test_dice_is_nan_when_a_label_is_absent_from_both():
    empty = np.zeros((2, 3, 3), dtype=np.uint8)
    scores = pipeline.dice_per_class(empty, empty, [1])
    assert math.isnan(scores[1])


def test_dice_perfect_and_shape_mismatch():
    label = np.random.default_rng(0).integers(0, 3, (5, 6, 7))
    assert pipeline.dice_per_class(label, label, [1, 2]) == {1: 1.0, 2: 1.0}
    with pytest.raises(ValueError, match="shape"):
        pipeline.dice_per_class(label, label[:-1], [1])


def _write_label(path: Path, array: np.ndarray) -> None:
    sitk.WriteImage(sitk.GetImageFromArray(array.astype(np.uint8)), str(path))


def test_evaluate_predictions_reads_label_files(tmp_path):
    ref, pred = tmp_path / "ref", tmp_path / "pred"
    ref.mkdir()
    pred.mkdir()
    label = np.zeros((3, 4, 4), dtype=np.uint8)
    label[1, 1:3, 1:3] = 1
    _write_label(ref / "case_001.nii.gz", label)
    _write_label(pred / "case_001.nii.gz", label)
    _write_label(ref / "case_002.nii.gz", label)
    _write_label(pred / "case_002.nii.gz", np.zeros_like(label))
    scores = pipeline.evaluate_predictions(pred, ref, ".nii.gz", [1])
    assert scores == {"case_001": {1: 1.0}, "case_002": {1: 0.0}}
    (pred / "case_002.nii.gz").unlink()
    with pytest.raises(NnsslJointError, match="case_002"):
        pipeline.evaluate_predictions(pred, ref, ".nii.gz", [1])


# ----------------------------------------------------------------------------------------------------
# splits and configurations


def test_few_label_split_is_deterministic_and_disjoint():
    ids = [f"SynthOrgans_{i:03d}" for i in range(6)]
    split = pipeline.few_label_split(ids, 2, seed=0)
    assert split == pipeline.few_label_split(list(reversed(ids)), 2, seed=0)
    assert len(split["train"]) == 2 and len(split["val"]) == 1
    assert not set(split["train"]) & set(split["val"])
    assert set(split["train"]) | set(split["val"]) <= set(ids)


def test_few_label_split_needs_a_validation_case():
    with pytest.raises(NnsslJointError, match="validation"):
        pipeline.few_label_split(["a", "b"], 2, seed=0)


def test_write_splits_writes_nnunet_fold_list(tmp_path):
    path = pipeline.write_splits(tmp_path / "Dataset503_X", {"train": ["a", "b"], "val": ["c"]})
    assert path.name == "splits_final.json"
    assert json.loads(path.read_text()) == [{"train": ["a", "b"], "val": ["c"]}]


def test_case_identifiers_strip_the_file_ending(tmp_path):
    for name in ("x_001.nii.gz", "x_000.nii.gz", "notes.txt"):
        (tmp_path / name).write_text("")
    assert pipeline.case_identifiers(tmp_path, ".nii.gz") == ["x_000", "x_001"]


def test_settings_validate_flags(tmp_path):
    with pytest.raises(NnsslJointError, match="budget"):
        demo.DemoSettings(out=tmp_path, budget="huge")
    with pytest.raises(NnsslJointError, match="labeled"):
        demo.DemoSettings(out=tmp_path, labeled=0)


def test_format_seconds():
    assert pipeline.format_seconds(5) == "5s"
    assert pipeline.format_seconds(130) == "2m10s"
    assert pipeline.format_seconds(3725) == "1h02m05s"


def test_progress_parses_nnunet_epoch_lines():
    stream = io.StringIO()
    progress = pipeline.StepProgress(4, 10, "pretraining", stream)
    progress.expect(8, "epoch")
    progress.feed("2026-11-25 20:54:02.327173: Epoch 2\n")
    progress.feed("2026-11-25 20:54:02.327173: train_loss 1.0\n")
    progress.finish()
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("[4/10] pretraining ...")
    assert "epoch 3/8" in lines[1]
    assert lines[-1].startswith("[4/10] pretraining done")


# ----------------------------------------------------------------------------------------------------
# resumability: markers, settings record


class _FakeDemo(demo.Demo):
    """The driver with steps that only count their calls."""

    calls: list[str]

    def steps(self):
        def make(key):
            def run(progress):
                self.calls.append(key)
                if key == "fail" and self.fail:
                    raise RuntimeError("killed")
                if key == "report":
                    self.report_folder.mkdir(parents=True, exist_ok=True)
                    (self.report_folder / "report.json").write_text(json.dumps({
                        "test_cases": ["a"], "summary": {"mean_dice": {a: 0.5 for a in demo.ARMS},
                                                         "gain_points": {"joint_vs_scratch": 0.0,
                                                                         "joint_vs_intra": 0.0}}}))
                return {"key": key}
            return run

        return [pipeline.Step(k, k, make(k)) for k in ("first", "fail", "report")]


def test_finished_steps_are_skipped_on_rerun(tmp_path):
    settings = demo.DemoSettings(out=tmp_path / "out", budget="tiny")
    first = _FakeDemo(settings, io.StringIO())
    first.calls, first.fail = [], True
    with pytest.raises(RuntimeError):
        first.run()
    assert first.calls == ["first", "fail"]
    second = _FakeDemo(settings, io.StringIO())
    second.calls, second.fail = [], False
    second.run()
    assert second.calls == ["fail", "report"]  # "first" was done; the report is always rebuilt


def test_rerun_with_other_settings_is_refused(tmp_path):
    settings = demo.DemoSettings(out=tmp_path / "out", budget="tiny")
    fake = _FakeDemo(settings, io.StringIO())
    fake.calls, fake.fail = [], False
    fake.run()
    other = _FakeDemo(demo.DemoSettings(out=tmp_path / "out", budget="tiny", labeled=1), io.StringIO())
    other.calls, other.fail = [], False
    with pytest.raises(NnsslJointError, match="labeled"):
        other.run()


# ----------------------------------------------------------------------------------------------------
# embeddings


def test_volume_windows_resize_and_pad():
    volume = np.random.default_rng(0).standard_normal((1, 40, 30, 26)).astype(np.float32)
    windows = demo.volume_windows(volume, n_slices=16, view_size=32, max_windows=3)
    assert windows.shape == (3, 1, 16, 32, 32)
    short = demo.volume_windows(volume[:, :5], n_slices=8, view_size=32)
    assert short.shape == (1, 1, 8, 32, 32)
    assert np.all(short[:, :, 5:] == 0)


def test_pretraining_model_roundtrip_and_embedding(tmp_path):
    import torch

    from nnssl_joint.models.preset import load_preset
    from nnssl_joint.pretrain.autoconfig import SelfConfiguration
    from nnssl_joint.pretrain.checkpoint import load_pretraining_model
    from nnssl_joint.pretrain.model import JointSSLModel
    from nnssl_joint.ssl.objective import ObjectiveConfig

    preset = load_preset("cpu")
    # the record keeps the user's "auto" sizes (defaults here); the network's sizes come from "resolved"
    resolved = SelfConfiguration(view_size=32, small_view_size=32, n_small_views=0, n_slices=4,
                                 batch_size_2d=4, batch_size_3d=2, num_prototypes_2d=8, num_prototypes_3d=4,
                                 freeze_prototypes_iterations=1, queue_start_iteration=1,
                                 memory_budget_gb=3.0, estimated_activation_gb=0.1)
    model = JointSSLModel(preset, 1, resolved.objective(ObjectiveConfig()))
    checkpoint = {"network_weights": model.state_dict(),
                  "nnssl_joint": {"preset": preset.to_dict(),
                                  "config": {"objective": ObjectiveConfig().to_dict()},
                                  "input_channels": 1, "resolved": resolved.to_dict()}}
    torch.save(checkpoint, tmp_path / "checkpoint_final.pth")
    loaded, meta = load_pretraining_model(tmp_path / "checkpoint_final.pth")
    assert meta["resolved"]["n_slices"] == 4
    windows = np.random.default_rng(0).standard_normal((2, 1, 4, 32, 32)).astype(np.float32)
    z = demo.embed_volumes(loaded, windows, [4, 2])
    assert z.shape == (2, preset.embedding_dim)
    np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1.0, rtol=1e-5)


def test_pca_2d_finds_the_main_direction():
    rng = np.random.default_rng(0)
    t = rng.standard_normal(50)
    features = np.outer(t, [3.0, 4.0, 0.0]) + 0.01 * rng.standard_normal((50, 3))
    coords, explained = report.pca_2d(features)
    assert coords.shape == (50, 2)
    assert explained[0] > 0.99
    assert abs(np.corrcoef(coords[:, 0], t)[0, 1]) > 0.99
    one, explained_one = report.pca_2d(np.ones((1, 4)))
    assert one.shape == (1, 2) and np.all(explained_one == 0)


# ----------------------------------------------------------------------------------------------------
# report from fake inputs


def _fake_report_data() -> dict:
    rng = np.random.default_rng(0)
    cases = ["SynthOrgans_003", "SynthOrgans_004"]
    classes = {"1": "liver_like", "2": "lesion_like", "3": "kidney_like"}
    base = {"scratch": 0.4, "nnunet": 0.45, "intra": 0.5, "joint": 0.6}
    dice = {arm: {case: {c: float(np.clip(b + 0.05 * rng.standard_normal(), 0, 1)) for c in classes}
                  for case in cases} for arm, b in base.items()}
    dice["scratch"][cases[0]]["2"] = math.nan
    logging = {"train_losses": [9.0, 8.0, 7.5], "loss_intra": [3.6, 3.5, 3.4],
               "loss_intra_3d": [3.6, 3.5, 3.4], "loss_inter": [1.5, 0.5, 0.3], "loss_mask": [0.2, 0.1, 0.05],
               "entropy_2d": [0.9, 0.8, 0.7], "entropy_3d": [0.9, 0.5, 0.4]}
    intra_log = {k: (list(v) if k in ("train_losses", "loss_intra", "entropy_2d") else [math.nan] * 3)
                 for k, v in logging.items()}
    random_init = ("scratch", "nnunet")
    image = rng.standard_normal((32, 32)).astype(np.float32)
    label = np.zeros((32, 32), dtype=np.uint8)
    label[8:16, 8:20] = 1
    montage = [{"case": c, "slice": 5, "image": image, "reference": label,
                "predictions": {a: label for a in demo.ARMS}, "dice": {a: 0.5 for a in demo.ARMS}}
               for c in cases]
    embeddings = {run: {"label": PRETRAIN_LABELS[run], "coords": rng.standard_normal((6, 2)).tolist(),
                        "groups": ["pool"] * 3 + ["task"] * 3, "cases": list("abcdef"),
                        "explained_variance": [0.6, 0.2],
                        "collapse_check": {"z_mean_pairwise_cosine": 0.99999 if run == "intra" else 0.3,
                                           "score_std_over_prototypes": 0.01, "log_k_2d": math.log(34),
                                           "volume_z_mean_pairwise_cosine": 0.999999,
                                           "n_slices": 10}} for run in PRETRAIN_RUNS}
    return {
        "settings": {"seed": 0, "labeled": 2, "budget": DEMO_BUDGETS["small"].to_dict(), "real": False,
                     "device": "cpu", "out": "/tmp/x"},
        "arms": dict(demo.ARM_LABELS), "classes": classes,
        "split": {"train": ["SynthOrgans_000", "SynthOrgans_001"], "val": ["SynthOrgans_002"]},
        "test_cases": cases, "dice": dice,
        "pretraining": {"joint": {"label": PRETRAIN_LABELS["joint"], "logging": logging},
                        "intra": {"label": PRETRAIN_LABELS["intra"], "logging": intra_log}},
        "finetuning": {arm: {"weights_check": None if arm in random_init else "all 120 keys present",
                             "pretrained_change": None if arm in random_init else 0.3,
                             "validation_dice": 0.5,
                             "logging": {"train_losses": [1.0, 0.5], "val_losses": [0.9, 0.6],
                                         "mean_fg_dice": [0.2, 0.4]}} for arm in demo.ARMS},
        "timings": {"generate": 1.0, "pretrain_joint": 100.0},
        "machine": {"cpus": 2, "platform": "test", "python": "3", "load_average": [1.0, 1.0, 1.0]},
        "montage": montage, "embeddings": embeddings,
    }


def test_summarize_dice_means_and_gains():
    data = _fake_report_data()
    summary = report.summarize_dice(data["dice"], data["classes"])
    scratch = data["dice"]["scratch"]
    expected = np.mean([np.nanmean(list(scratch[c].values())) for c in scratch])
    assert summary["mean_dice"]["scratch"] == pytest.approx(expected)
    assert summary["per_class"]["scratch"]["2"]["n"] == 1  # the NaN is skipped
    gain = summary["gain_points"]["joint_vs_scratch"]
    assert gain == pytest.approx(100 * (summary["mean_dice"]["joint"] - summary["mean_dice"]["scratch"]))
    assert summary["verdict"]["joint_beats_scratch_by_target"] == (gain >= report.TARGET_GAIN_POINTS)


def test_collapse_verdicts():
    data = _fake_report_data()
    data["pretraining"]["joint"]["logging"]["loss_intra"][-1] = math.log(34) * 1.001  # at log K
    verdicts = report.collapse_verdicts(data)
    assert verdicts["joint"]["loss_at_log_k"] and verdicts["joint"]["collapsed"]
    assert verdicts["intra"]["projections_coincide"] and not verdicts["intra"]["loss_at_log_k"]
    assert verdicts["joint"]["volume_features_collapsed"]  # cosine 0.999999
    assert not verdicts["intra"]["volume_features_collapsed"]  # f_inter is not trained by L_intra alone
    data["pretraining"]["joint"]["logging"]["loss_intra"][-1] = 2.0
    assert not report.collapse_verdicts(data)["joint"]["collapsed"]


def test_write_report_from_fake_inputs(tmp_path):
    files = report.write_report(_fake_report_data(), tmp_path / "report")
    for name in ("report.md", "report.json", "dice.png", "pretraining_curves.png", "finetuning_curves.png",
                 "montage.png", "embeddings.png"):
        assert (tmp_path / "report" / name).is_file(), name
        assert (tmp_path / "report" / name).stat().st_size > 0
    record = json.loads(files["json"].read_text())
    assert set(record["summary"]["mean_dice"]) == set(demo.ARMS)
    assert record["dice"]["scratch"]["SynthOrgans_003"]["2"] is None  # NaN -> null, valid JSON
    assert "montage" not in record and record["montage_cases"][0]["case"] == "SynthOrgans_003"
    markdown = files["markdown"].read_text()
    for label in demo.ARM_LABELS.values():
        assert label in markdown
    assert "![Dice per class and arm](dice.png)" in markdown
    line = demo.summary_line(record, 600)
    gain = record["summary"]["gain_points"]
    for arm, name in (("joint", "joint"), ("intra", "2D-only")):  # both baselines for each pretrained arm
        assert f"{name} - scratch {gain[f'{arm}_vs_scratch']:+.1f}" in line
        assert f"{name} - stock nnU-Net {gain[f'{arm}_vs_nnunet']:+.1f}" in line
        assert f"{name} - stock nnU-Net **{gain[f'{arm}_vs_nnunet']:+.1f}**" in markdown
    assert "nnunet " in line and "all steps 10m00s" in line and "nan" not in line


def test_summary_line_leaves_out_differences_of_arms_that_did_not_run():
    record = {"test_cases": ["a", "b"], "summary": {"mean_dice": {"scratch": 0.2, "joint": 0.25},
                                                    "gain_points": {"joint_vs_scratch": 5.0}}}
    assert demo.summary_line(record, 61) == ("Dice (mean over classes and 2 test cases): scratch 0.200 | "
                                             "joint 0.250; points: joint - scratch +5.0; all steps 1m01s")


def test_the_stock_arm_trains_nnunet_itself_on_its_own_plans(tmp_path):
    d = demo.Demo(demo.DemoSettings(out=tmp_path), io.StringIO())
    keys = [s.key for s in d.steps()]
    assert keys.index("plan_stock") < keys.index("finetune_nnunet") < keys.index("report")
    assert {"finetune_scratch", "finetune_intra", "finetune_joint"} < set(keys)
    assert d.trainer_and_plans("nnunet") == ("nnUNetTrainerBudget", "nnUNetPlans")
    assert d.trainer_and_plans("joint") == ("JointSSLFinetuneTrainer", "nnsslJointPlans")
    assert d.finetune_folder("nnunet").parent.name == "nnUNetTrainerBudget__nnUNetPlans__3d_fullres"
    assert d.finetune_folder("scratch").parent.name == "JointSSLFinetuneTrainer__nnsslJointPlans__3d_fullres"


# ----------------------------------------------------------------------------------------------------
# command line


def test_demo_subcommand_is_registered():
    import argparse

    parser = argparse.ArgumentParser()
    demo.register_cli(parser.add_subparsers())
    args = parser.parse_args(["demo", "--out", "x", "--budget", "tiny", "--labeled", "1", "--real"])
    assert (args.out, args.budget, args.labeled, args.real) == ("x", "tiny", 1, True)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_tiny_demo_end_to_end(tmp_path):
    """The whole pipeline with the smoke-test budget: every report file and three arms with numbers."""
    result = demo.run_demo(demo.DemoSettings(out=tmp_path / "demo", budget="tiny", labeled=1), io.StringIO())
    assert set(result["summary"]["mean_dice"]) == set(demo.ARMS)
    for name in ("report.md", "report.json", "dice.png", "pretraining_curves.png", "montage.png",
                 "embeddings.png"):
        assert (tmp_path / "demo" / "report" / name).is_file()
    assert result["finetuning"]["joint"]["weights_check"]


# ----------------------------------------------------------------------------------------------------
# several processes on one output folder (nnssl_joint.experiments.pipeline)


def test_a_step_locked_elsewhere_is_skipped_when_parallel_and_waited_for_otherwise(tmp_path):
    import fcntl
    import threading

    from nnssl_joint.experiments.pipeline import Pipeline, Step

    calls = []
    pipeline = Pipeline(tmp_path, stream=io.StringIO())
    pipeline.state_folder.mkdir(parents=True)
    # another worker holds the locks of "shared" and "run_a" (an open file description of its own)
    held = {key: open(pipeline.state_folder / f"{key}.lock", "a+")  # noqa: SIM115 (closed below)
            for key in ("shared", "run_a")}
    for handle in held.values():
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        handle.write("process 4242 on elsewhere")
        handle.flush()

    def finish_shared():
        (pipeline.state_folder / "shared.done.json").write_text(json.dumps({"seconds": 1.0, "info": {}}))
        held["shared"].close()

    timer = threading.Timer(0.5, finish_shared)
    timer.start()
    steps = [Step("shared", "shared", lambda p: calls.append("shared")),
             Step("run_a", "run a", lambda p: calls.append("run_a"), parallel=True),
             Step("run_b", "run b", lambda p: calls.append("run_b"), parallel=True)]
    pipeline.run_steps(steps)
    timer.join()
    out = pipeline.stream.getvalue()
    assert calls == ["run_b"]  # "shared" was finished by the other worker while we waited
    assert "shared: waiting for process 4242 on elsewhere" in out
    assert "run a: running in process 4242 on elsewhere, skipped here" in out
    assert (pipeline.state_folder / "run_b.done.json").is_file()
    assert not (pipeline.state_folder / "run_a.done.json").exists()
    held["run_a"].close()
    # the lock died with its holder: a later run takes the step
    pipeline.run_steps(steps)
    assert calls == ["run_b", "run_a"]


def test_preset_follows_the_device_and_is_recorded(tmp_path):
    # on CPU the demo keeps the quick cpu preset (the benchmark defaults to nnunet, test_benchmark.py); its
    # records carry no preset key, as before
    assert demo.DemoSettings(out=tmp_path).preset == "cpu"
    assert "preset" not in demo.DemoSettings(out=tmp_path).record()
    assert demo.DemoSettings(out=tmp_path, preset="nnunet").record()["preset"] == "nnunet"
    on_gpu = demo.DemoSettings(out=tmp_path, device="cuda")
    # a CUDA run benchmarks the GPU network
    assert on_gpu.preset == "gpu" and on_gpu.record()["preset"] == "gpu"
    assert demo.DemoSettings(out=tmp_path, preset="nnunet").preset == "nnunet"
    with pytest.raises(NnsslJointError, match="--preset 'huge': use one of cpu, gpu, nnunet"):
        demo.DemoSettings(out=tmp_path, preset="huge")
    steps = [s.key for s in
             demo.Demo(demo.DemoSettings(out=tmp_path, preset="nnunet"), io.StringIO()).steps()]
    assert steps.index("plan_stock") < steps.index("pretrain_joint")  # the preset exists before pretraining


def test_pretraining_and_downstream_plans_of_different_presets_are_refused(tmp_path):
    import torch

    from nnssl_joint.models.preset import load_preset

    plans = tmp_path / "nnsslJointPlans.json"
    plans.write_text(json.dumps({"nnssl_joint": {"preset": load_preset("cpu").to_dict()}}))
    weights = tmp_path / "pretrained_for_3d_fullres.pth"
    torch.save({"network_weights": {}, "nnssl_joint": {"preset": load_preset("cpu").to_dict()}}, weights)
    pipeline.check_presets_agree(plans, weights)
    torch.save({"network_weights": {}, "nnssl_joint": {"preset": load_preset("gpu").to_dict()}}, weights)
    with pytest.raises(NnsslJointError,
                       match="planned with preset 'cpu' but .* pretrained with preset 'gpu'.*one --preset"):
        pipeline.check_presets_agree(plans, weights)


def test_pretraining_objective_and_options_reach_both_runs_and_are_checked_first(tmp_path):
    # the switch that lets a demo pretrain with an ablation arm (docs/pretraining.md), e.g. the 3D queue off
    args = argparse.ArgumentParser()
    demo.add_arguments(args)
    parsed = args.parse_args(["--out", str(tmp_path), "--pretrain-objective", '{"queue_length_3d": 0}',
                              "--pretrain-options", '{"data": {"batch_size_3d": 8}}'])
    settings = demo._settings_from_args(parsed)
    assert settings.record()["pretrain_objective"] == {"queue_length_3d": 0}
    assert settings.record()["pretrain_options"] == {"data": {"batch_size_3d": 8}}
    assert "pretrain_objective" not in demo.DemoSettings(out=tmp_path).record()  # earlier records unchanged
    run = demo.Demo(settings, io.StringIO())
    seen = {}
    run.pretrain = lambda name, config, *rest: seen.setdefault(name, config)
    for name in demo.PRETRAIN_RUNS:
        run.step_pretrain(name, None)
        assert seen[name]["objective"]["queue_length_3d"] == 0
        assert seen[name]["data"] == {"batch_size_3d": 8}
        assert seen[name]["optim"]["num_epochs"] == settings.budget_spec.training.pretrain_epochs
    assert seen["intra"]["objective"]["lambda_inter"] == 0.0  # the 2D-only run stays 2D-only
    # a volume term's weight (the thirteenth pass's contrastive term) reaches the joint run only
    volume = demo.DemoSettings(out=tmp_path, pretrain_objective={"lambda_volume_contrast": 1.0})
    seen.clear()
    run = demo.Demo(volume, io.StringIO())
    run.pretrain = lambda name, config, *rest: seen.setdefault(name, config)
    for name in demo.PRETRAIN_RUNS:
        run.step_pretrain(name, None)
    assert seen["intra"]["objective"]["lambda_volume_contrast"] == 0.0
    assert seen["joint"]["objective"]["lambda_volume_contrast"] == 1.0
    with pytest.raises(NnsslJointError, match="--pretrain-options: 'objective' is set with"):
        demo.DemoSettings(out=tmp_path, pretrain_options={"objective": {"lambda_dense": 1.0}})
