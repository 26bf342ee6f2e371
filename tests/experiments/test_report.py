"""The report writers (nnssl_joint/experiments/report.py) on small hand-made result dicts whose numbers are
known; test_demo.py covers the demo's full fake report, this file the numbers and the benchmark report."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

from nnssl_joint.experiments import benchmark, report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _assert_png(path: Path) -> None:
    from PIL import Image

    assert path.read_bytes()[:8] == PNG_SIGNATURE, path
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.size[0] > 100 and image.size[1] > 100


# ----------------------------------------------------------------------------------------------------
# the demo's report

DICE = {"scratch": {"a": {"1": 0.2, "2": 0.4}, "b": {"1": 0.6, "2": math.nan}},
        "joint": {"a": {"1": 0.5, "2": 0.7}, "b": {"1": 0.9, "2": 0.8}}}
CLASSES = {"1": "liver", "2": "lesion"}


def test_summarize_dice_on_known_numbers():
    summary = report.summarize_dice(DICE, CLASSES)
    # case means: scratch a 0.3, b 0.6 (NaN skipped) -> 0.45; joint a 0.6, b 0.85 -> 0.725
    assert summary["mean_dice"] == {"scratch": pytest.approx(0.45), "joint": pytest.approx(0.725)}
    assert summary["per_class"]["scratch"]["1"] == {"mean": pytest.approx(0.4), "std": pytest.approx(0.2),
                                                   "n": 2}
    assert summary["per_class"]["scratch"]["2"] == {"mean": pytest.approx(0.4), "std": 0.0, "n": 1}
    assert summary["gain_points"] == {"joint_vs_scratch": pytest.approx(27.5)}  # no intra arm, no other gain
    assert summary["verdict"] == {"joint_beats_scratch_by_target": True}
    below = report.summarize_dice({"scratch": DICE["scratch"], "joint": DICE["scratch"]}, CLASSES)
    assert below["gain_points"]["joint_vs_scratch"] == 0.0
    assert below["verdict"]["joint_beats_scratch_by_target"] is False


def test_every_pretrained_arm_is_compared_with_stock_nnunet_and_scratch():
    # case means: scratch 0.45, nnunet a 0.5, b 0.7 -> 0.6, joint 0.725
    dice = {**DICE, "nnunet": {"a": {"1": 0.4, "2": 0.6}, "b": {"1": 0.7, "2": 0.7}}}
    summary = report.summarize_dice(dice, CLASSES)
    assert summary["gain_points"] == {"joint_vs_scratch": pytest.approx(27.5),
                                      "joint_vs_nnunet": pytest.approx(12.5),
                                      "scratch_vs_nnunet": pytest.approx(-15.0)}
    assert summary["verdict"]["scratch_within_tolerance_of_nnunet"] is False  # -15 points, tolerance 1
    close = report.summarize_dice({"scratch": dice["nnunet"], "nnunet": {"a": {"1": 0.41, "2": 0.6},
                                                                         "b": {"1": 0.7, "2": 0.7}}}, CLASSES)
    assert close["gain_points"]["scratch_vs_nnunet"] == pytest.approx(-0.25)
    assert close["verdict"]["scratch_within_tolerance_of_nnunet"] is True
    assert report.gain_phrases(summary["gain_points"], bold=("joint_vs_nnunet",)) == [
        "joint - scratch +27.5", "joint - stock nnU-Net **+12.5**", "scratch - stock nnU-Net -15.0"]

    data = _minimal_demo_data()
    data["dice"] = dice
    data["arms"]["nnunet"] = "stock nnU-Net (nnUNetPlans, from scratch)"
    data["finetuning"]["nnunet"] = {"logging": {"train_losses": [0.8]}, "validation_dice": 0.75}
    markdown = report.render_markdown(data, summary)
    assert ("Differences in Dice points: joint - scratch **+27.5**, joint - stock nnU-Net **+12.5**, "
            "scratch - stock nnU-Net -15.0.") in markdown
    stock = "| stock nnU-Net (nnUNetPlans, from scratch) |"
    assert f"{stock} 0.550 ± 0.15 | 0.650 ± 0.05 | **0.600** |" in markdown
    assert f"{stock} n/a (random initialisation) | n/a | 0.750 |" in markdown
    assert "within 1 point of stock nnU-Net: **not met** in this run" in markdown
    assert "stock nnU-Net: nnUNetPlans, nnUNetTrainerBudget" in markdown
    # the schedule sentence follows the budget's warm-up (1 here; 0 in the built-in budgets)
    assert "1 warm-up epoch(s) for the runs from pretrained weights, none from scratch" in markdown
    data["settings"]["budget"]["finetune_warmup_epochs"] = 0
    markdown = report.render_markdown(data, summary)
    assert "nnU-Net's poly schedule for every arm, no warm-up" in markdown
    assert "warm-up epoch(s)" not in markdown


@pytest.mark.filterwarnings("ignore:Mean of empty slice:RuntimeWarning")
def test_a_class_without_any_finite_dice_is_nan():
    summary = report.summarize_dice({"scratch": {"a": {"1": math.nan}}}, {"1": "x"})
    assert math.isnan(summary["per_class"]["scratch"]["1"]["mean"])
    assert summary["per_class"]["scratch"]["1"]["n"] == 0


def _minimal_demo_data() -> dict:
    budget = {"name": "tiny", "n_3d": 3, "n_2d": 4, "pretrain_epochs": 2, "pretrain_iterations": 5,
              "finetune_epochs": 3, "finetune_iterations": 6, "finetune_warmup_epochs": 1,
              "test_time_augmentation": False}
    return {
        "settings": {"seed": 7, "labeled": 1, "budget": budget, "real": False},
        "arms": {"scratch": "from scratch", "joint": "joint pretraining"}, "classes": CLASSES,
        "split": {"train": ["t0"], "val": ["v0"]}, "test_cases": ["a", "b"], "dice": DICE,
        "pretraining": {"joint": {"label": "joint pretraining",
                                  "logging": {"train_losses": [3.0, 2.5], "loss_intra": [1.25, math.nan]}}},
        "finetuning": {"scratch": {"logging": {"train_losses": [1.0, 0.5]}, "validation_dice": 0.25},
                       "joint": {"weights_check": "all 12 keys present", "pretrained_change": 0.125,
                                 "validation_dice": np.float32(0.5), "logging": {"train_losses": [0.9]}}},
        "timings": {"generate": 61.0, "pretrain_joint": 59.4},
        "machine": {"cpus": 2, "platform": "test", "python": "3.x", "load_average": [0.5]},
    }


def test_write_report_writes_the_numbers_it_was_given(tmp_path):
    files = report.write_report(_minimal_demo_data(), tmp_path / "r")
    # no montage, embeddings or probe in the data: no such figures
    assert set(files) == {"dice", "pretraining_curves", "finetuning_curves", "markdown", "json"}
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == sorted(p.name for p in files.values())
    for key in ("dice", "pretraining_curves", "finetuning_curves"):
        _assert_png(files[key])

    markdown = files["markdown"].read_text()
    assert "| from scratch | 0.400 ± 0.20 | 0.400 ± 0.00 | **0.450** |" in markdown
    assert "| joint pretraining | 0.700 ± 0.20 | 0.750 ± 0.05 | **0.725** |" in markdown
    # only the difference of arms that ran: no 2D-only arm, so no "joint - 2D-only" (never "+nan")
    assert "Differences in Dice points: joint - scratch **+27.5**." in markdown
    assert "nan" not in markdown and "2D-only" not in markdown
    assert "Targets:" not in markdown  # both targets need an arm that did not run (2D-only, stock nnU-Net)
    assert "seed 7, 2 held-back test cases (a, b)" in markdown
    # a record without a preset key is the default preset; no overrides, no override sentence
    assert "Preset `cpu`." in markdown and "overrides" not in markdown
    # the final finite L_intra (the NaN of the last epoch is skipped)
    assert "| joint pretraining | 2.500 | 1.250 | n/a | n/a | n/a | n/a | n/a |" in markdown
    assert "| from scratch | n/a (random initialisation) | n/a | 0.250 |" in markdown
    assert "| joint pretraining | all 12 keys present | 12.5% (relative L2) | 0.500 |" in markdown
    assert "| generate | 1m01s |" in markdown and "| pretrain_joint | 59s |" in markdown
    assert "| **total (before this report)** | **2m00s** |" in markdown
    assert "## Volume embeddings" not in markdown  # no embeddings in the data

    record = json.loads(files["json"].read_text())
    assert record["dice"]["scratch"]["b"]["2"] is None  # NaN -> null
    assert record["finetuning"]["joint"]["validation_dice"] == 0.5  # numpy float -> JSON number
    assert record["summary"]["mean_dice"]["joint"] == pytest.approx(0.725)
    assert record["summary"]["collapse"] == {} and record["montage_cases"] == []


def test_json_ready_turns_numpy_and_non_finite_values_into_json():
    value = {1: (np.int64(3), np.float32(0.5)), "x": np.array([1.0, np.inf]), "s": "text", "n": None}
    assert report._json_ready(value) == {"1": [3, 0.5], "x": [1.0, None], "s": "text", "n": None}


def test_pca_2d_refuses_an_empty_array():
    with pytest.raises(ValueError, match="non-empty"):
        report.pca_2d(np.zeros((0, 3)))


# ----------------------------------------------------------------------------------------------------
# the benchmark's report

SEEDS = (0, 1)
LABELED = (1, 4)
#: mean Dice of each run; joint gains +10 points over scratch on every run, nnunet +5 at 1 case only
_MEAN_DICE = {("scratch", 1, 0): 0.30, ("scratch", 1, 1): 0.50, ("scratch", 4, 0): 0.60,
              ("scratch", 4, 1): 0.70,
              ("nnunet", 1, 0): 0.35, ("nnunet", 1, 1): 0.55, ("nnunet", 4, 0): 0.55, ("nnunet", 4, 1): 0.75,
              ("joint", 1, 0): 0.40, ("joint", 1, 1): 0.60, ("joint", 4, 0): 0.70}  # joint L4_s1 not finished


def _benchmark_data() -> dict:
    classes = {"1": "liver", "2": "lesion"}
    results = {}
    for (arm, k, seed), mean in _MEAN_DICE.items():
        results[f"{arm}/{benchmark.run_name(k, seed)}"] = {
            "arm": arm, "labeled": k, "seed": seed, "fold": seed, "mean_dice": mean,
            "dice": {"c0": {"1": mean, "2": mean}}, "run_folder": f"/runs/{arm}/{k}/{seed}",
            "validation_cases": ["v"], "trainer": "T", "plans_name": "P", "network_class": "pkg.mod.Net"}
    arms = ("scratch", "nnunet", "joint")
    return {"settings": {"labeled": list(LABELED), "configuration": "3d_fullres", "seeds": len(SEEDS),
                         "budget": {"name": "tiny"}, "device": "cpu"},
            "target": "Dataset623_X", "pretraining_sources": ["Dataset621_A"], "finished_runs": len(results),
            "planned_runs": 12, "written": "now", "test_cases": ["c0"], "test_source": "held out",
            "arms": {a: a.upper() for a in arms}, "classes": classes, "runs": results,
            "summary": benchmark.aggregate(results, arms, LABELED, SEEDS, classes)}


def test_paired_gains_of_the_benchmark_summary():
    summary = _benchmark_data()["summary"]
    joint_1 = summary["joint"]["1"]
    assert joint_1["gain_vs_scratch_points"]["mean"] == pytest.approx(10.0)
    assert joint_1["gain_vs_scratch_points"]["std"] == pytest.approx(0.0, abs=1e-9)
    assert joint_1["wins_vs_scratch"] == "2/2"
    assert joint_1["gain_vs_nnunet_points"]["mean"] == pytest.approx(5.0)
    joint_4 = summary["joint"]["4"]  # one seed missing: paired over the seed both arms finished
    assert joint_4["per_seed"] == {"0": 0.7, "1": None}
    ten = pytest.approx(10.0)
    assert joint_4["gain_vs_scratch_points"] == {"mean": ten, "std": None, "min": ten, "max": ten, "n": 1,
                                                 "ci95": None}  # one seed: no interval
    assert joint_4["wins_vs_nnunet"] == "1/1"
    nnunet_4 = summary["nnunet"]["4"]  # -5 and +5 points: no mean gain, one win
    assert nnunet_4["gain_vs_scratch_points"]["mean"] == pytest.approx(0.0, abs=1e-9)
    assert nnunet_4["wins_vs_scratch"] == "1/2"
    assert "gain_vs_nnunet_points" not in nnunet_4 and "gain_vs_scratch_points" not in summary["scratch"]["1"]


def test_write_benchmark_report_files_and_numbers(tmp_path):
    data = _benchmark_data()
    files = report.write_benchmark_report(data, tmp_path / "report")
    assert sorted(p.name for p in (tmp_path / "report").iterdir()) == sorted(
        ["benchmark.png", "benchmark_paired.png", "benchmark_classes.png", "benchmark.md", "benchmark.json"])
    for key in ("png", "paired", "classes"):
        _assert_png(files[key])

    markdown = files["markdown"].read_text()
    assert "Finished runs: 11 of 12 (report written now)." in markdown
    assert "| SCRATCH | 0.400 ± 0.141 (n=2) | 0.650 ± 0.071 (n=2) |" in markdown
    assert "| JOINT | 0.500 ± 0.141 (n=2) | 0.700 (n=1) |" in markdown
    assert "## Gain over SCRATCH" in markdown and "## Gain over NNUNET" in markdown
    assert "| joint | +10.0 ± 0.0 [+10.0, +10.0] pts, wins 2/2 | +10.0 pts, wins 1/1 |" in markdown
    assert ("| nnunet | +5.0 ± 0.0 [+5.0, +5.0] pts, wins 2/2 | +0.0 ± 7.1 [-5.0, +5.0] pts, wins 1/2 |"
            in markdown)
    assert "- scratch, 1 labeled: liver 0.400 ± 0.141 (n=2), lesion 0.400 ± 0.141 (n=2)" in markdown
    assert "| joint | 4 | 0 | 0 | 0.700 | v | T / P / Net | `/runs/joint/4/0` |" in markdown

    record = json.loads(files["json"].read_text())
    assert record["summary"]["joint"]["4"]["per_seed"] == {"0": 0.7, "1": None}
    assert record["summary"]["joint"]["1"]["gain_vs_scratch_points"]["mean"] == pytest.approx(10.0)


def test_the_demo_report_names_the_preset_and_the_pretraining_overrides(tmp_path):
    data = _minimal_demo_data()
    data["settings"].update(preset="nnunet", pretrain_objective={"queue_length_3d": 0},
                            pretrain_options={"data": {"batch_size_3d": 8}})
    markdown = report.write_report(data, tmp_path / "r")["markdown"].read_text()
    assert "Preset `nnunet`." in markdown
    assert 'Pretraining objective overrides {"queue_length_3d": 0}.' in markdown
    assert 'Pretraining data/optim options {"data": {"batch_size_3d": 8}}.' in markdown
    assert "2D-only pretraining leaves out" not in markdown  # no volume-term weight among the overrides
    data["settings"]["pretrain_objective"] = {"lambda_volume_contrast": 1, "lambda_dense": 1.0}
    markdown = report.write_report(data, tmp_path / "r2")["markdown"].read_text()
    assert "2D-only pretraining leaves out" not in markdown  # this report has no 2D-only arm
    data["arms"]["intra"] = "2D-only pretraining"  # the demo's arms
    data["dice"]["intra"] = data["dice"]["joint"]
    markdown = report.write_report(data, tmp_path / "r3")["markdown"].read_text()
    assert ('Pretraining objective overrides {"lambda_volume_contrast": 1, "lambda_dense": 1.0}. 2D-only '
            "pretraining leaves out lambda_volume_contrast=1 (a volume term; the arm has none).") in markdown


def test_the_benchmark_report_names_what_2d_only_set_aside_only_when_that_arm_ran():
    """The 2D-only arm keeps its volume-term weights at 0; the report says so where the arm is in the run and
    is silent about an arm that did not run."""
    data = _benchmark_data()  # arms scratch, nnunet, joint
    data["settings"]["pretrain_objective"] = {"lambda_volume_contrast": 1, "lambda_dense": 1.0}
    markdown = report.render_benchmark_markdown(data)
    assert 'Pretraining objective overrides {"lambda_volume_contrast": 1, "lambda_dense": 1.0}.' in markdown
    assert "2D-only pretraining leaves out" not in markdown
    data["arms"]["intra"] = "2D-ONLY"
    markdown = report.render_benchmark_markdown(data)
    assert ("2D-only pretraining leaves out lambda_volume_contrast=1 (a volume term; the arm has none)."
            in markdown)


def test_the_benchmark_report_states_the_fine_tuning_schedule():
    from nnssl_joint.experiments.budgets import TrainingBudget

    data = _benchmark_data()
    data["settings"]["budget"] = asdict(TrainingBudget.named("small"))
    assert "same schedule, nnU-Net's poly decay, no warm-up." in report.render_benchmark_markdown(data)
    data["settings"]["recipe"] = "nnunet_warmup"  # nnU-Net's 5% of 20 epochs
    assert ("Runs from pretrained weights warm up for 1 epoch(s) (recipe nnunet_warmup); scratch and "
            "stock nnU-Net do not" in report.render_benchmark_markdown(data))
    data["settings"]["budget"]["finetune_warmup_epochs"] = 3
    assert "warm up for 3 epoch(s)" in report.render_benchmark_markdown(data)


def test_the_benchmark_report_has_a_section_per_heldout_read_out_with_the_test_sets_tables():
    """A held-out read-out is summarised as the test set (aggregate) and rendered with the same tables, under
    its own heading, with each run's held-out Dice next to its test Dice."""
    data = _benchmark_data()
    classes = data["classes"]
    # held-out Dice: every run 0.1 below its test Dice, except joint L1_s1 (0.2 below)
    heldout = {key: {**run, "mean_dice": run["mean_dice"] - (0.2 if key == "joint/L1_s1" else 0.1),
                     "dice": {"h0": {"1": run["mean_dice"] - 0.1, "2": run["mean_dice"] - 0.1}}}
               for key, run in data["runs"].items()}
    heldout["joint/L1_s1"]["dice"] = {"h0": {"1": 0.4, "2": 0.4}}
    data["heldout"] = {"Dataset624_H": {
        "dataset": "Dataset624_H", "cases": 7, "test_source": "imagesTs/labelsTs", "source": "/raw/D624_H",
        "finished_runs": len(heldout), "planned_runs": 12, "runs": heldout,
        "summary": benchmark.aggregate(heldout, ("scratch", "nnunet", "joint"), LABELED, SEEDS, classes)}}
    markdown = report.render_benchmark_markdown(data)
    test_part, section = markdown.split(
        "## Held-out read-out: Dataset624_H (7 cases; nothing trains or tunes on them)")
    section = section.split("\n## Runs")[0]
    # the test set's tables are unchanged, the held-out section has the same layout one level down
    assert "| SCRATCH | 0.400 ± 0.141 (n=2) | 0.650 ± 0.071 (n=2) |" in test_part
    assert "### Dice (mean over classes and held-out cases; mean ± std over seeds)" in section
    assert "| SCRATCH | 0.300 ± 0.141 (n=2) | 0.550 ± 0.071 (n=2) |" in section
    assert "| JOINT | 0.350 ± 0.071 (n=2) | 0.600 (n=1) |" in section
    assert "### Gain over SCRATCH" in section and "### Gain over NNUNET" in section
    assert "| joint | +5.0 ± 7.1 [+0.0, +10.0] pts, wins 1/2 | +10.0 pts, wins 1/1 |" in section  # +10, 0
    assert "- scratch, 1 labeled: liver 0.300 ± 0.141 (n=2), lesion 0.300 ± 0.141 (n=2)" in section
    assert "| joint | 1 | 1 | 0.400 | 0.600 |" in section  # held-out next to test
    assert "finished 11 of 12 runs" in section
    text = benchmark.summary_text(data, 5.0)
    assert "Held-out read-out Dataset624_H (7 cases; 11/12 runs):" in text
    assert "  joint    1 labeled 0.350±0.071 (+5.0 pts vs scratch)" in text
    assert "## Held-out read-out" not in report.render_benchmark_markdown(_benchmark_data())
