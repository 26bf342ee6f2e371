"""The prepare / plan_and_preprocess commands, and one real end-to-end run through the command line.

The end-to-end run goes through a subprocess, as a user would: nnU-Net's worker pools spawn fresh
interpreters, and the subprocess sees exactly the nnUNet_* variables of this test.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from planning_data import NnUNetDirs, make_png_dataset, make_volume_dataset

import nnssl_joint
from nnssl_joint.planning.cli import main, register_cli
from nnssl_joint.planning.settings import DEFAULT_PLANS_NAME, PRETRAINING_CONFIGURATION, SpacingSpec

REPO = Path(__file__).resolve().parents[2]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    register_cli(p.add_subparsers(dest="command"))
    return p


def test_register_cli_adds_both_commands() -> None:
    args = parser().parse_args(["prepare", "-d", "501", "502", "-o", "900", "--name", "Joint", "--overwrite"])
    assert (args.dataset_ids, args.target_id, args.name, args.overwrite) == ([501, 502], 900, "Joint", True)
    assert callable(args.func)
    args = parser().parse_args(["plan_and_preprocess", "-d", "900", "-np", "2", "--spacing", "0.8",
                                "--verify"])
    assert args.dataset_ids == [900] and args.np == 2 and args.npfp is None and args.verify
    assert args.spacing == SpacingSpec("fixed", (0.8, 0.8)) and args.plans_name == DEFAULT_PLANS_NAME
    assert parser().parse_args(["plan_and_preprocess", "-d", "1"]).spacing == SpacingSpec("median")


def test_bad_spacing_is_an_argument_error(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        parser().parse_args(["plan_and_preprocess", "-d", "900", "--spacing", "fine"])
    assert "Invalid spacing 'fine'" in capsys.readouterr().err


def test_user_errors_are_reported_without_traceback(nnunet_dirs: NnUNetDirs,
                                                    capsys: pytest.CaptureFixture) -> None:
    assert main(["prepare", "-d", "777", "-o", "900", "--name", "Joint"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("nnssl_joint prepare: error: No dataset with id 777") and "Traceback" not in err


def cli_module() -> str:
    """The top-level CLI where it exists, else this package's own entry point."""
    return "nnssl_joint.cli" if importlib.util.find_spec("nnssl_joint.cli") else "nnssl_joint.planning.cli"


def run_cli(dirs: NnUNetDirs, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("nnUNet_")}
    env.update(dirs.env())
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    result = subprocess.run([sys.executable, "-m", cli_module(), *args], check=False, env=env, cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{args[0]} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def test_end_to_end_prepare_plan_and_preprocess(nnunet_dirs: NnUNetDirs) -> None:
    raw = nnunet_dirs.raw
    make_volume_dataset(raw, 501, "BrainMR", [((12, 24, 24), (1.0, 1.0, 1.0)), ((6, 24, 20), (3.0, 0.9, 0.9)),
                                              ((10, 20, 24), (2.0, 1.1, 1.1))], empty_end_slices=1)
    make_png_dataset(raw, 502, "ChestXray", n=3, size=(32, 32))
    make_volume_dataset(raw, 503, "AbdomenCT",
                        [((8, 24, 24), (2.5, 0.8, 0.8)), ((9, 24, 24), (1.5, 0.8, 0.8))],
                        modality="CT", file_ending=".mha", seed=3)

    run_cli(nnunet_dirs, "prepare", "-d", "501", "502", "503", "-o", "900", "--name", "JointPretrain")
    result = run_cli(nnunet_dirs, "plan_and_preprocess", "-d", "900", "-np", "1", "-npfp", "1", "--verify")

    name = "Dataset900_JointPretrain"
    provenance = json.loads((raw / name / "provenance.json").read_text())
    cases = provenance["cases"]
    assert len(cases) == 8 and json.loads((raw / name / "dataset.json").read_text())["numTraining"] == 8
    for record in cases.values():
        assert all(Path(f).is_file() for f in record["source_files"])
        assert record["source_dataset"] in provenance["sources"]

    preprocessed = nnunet_dirs.preprocessed / name
    plans = json.loads((preprocessed / f"{DEFAULT_PLANS_NAME}.json").read_text())
    assert plans["nnssl_joint"]["version"] == nnssl_joint.__version__
    configuration = plans["configurations"][PRETRAINING_CONFIGURATION]
    assert configuration["spacing_mode"] == "median"
    # CT and MR/X-ray cases: each normalised by its modality
    per_case = configuration["per_case_normalization"]
    assert not (preprocessed / "gt_segmentations").exists()

    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2

    data_folder = preprocessed / configuration["data_identifier"]
    dataset = nnUNetDatasetBlosc2(str(data_folder))
    assert sorted(dataset.identifiers) == sorted(cases)
    for identifier, record in cases.items():
        data, seg, _, _ = dataset.load_case(identifier)
        data, seg = np.asarray(data[:]), np.asarray(seg[:])
        slices = data.shape[1]
        if record["dim"] == 2:
            assert slices == 1
        else:
            empty_ends = 2 if identifier == "D501_case2" else 0
            assert slices == record["original_shape"][0] - empty_ends
        assert np.isfinite(data).all()
        if record["channel_names"]["0"] in ("MR", "Xray"):  # z-scored per image over the region used
            use_mask = per_case["use_mask_for_norm"]["0"]["ZScoreNormalization"]
            region = data[0][seg[0] >= 0] if use_mask else data[0]
            assert abs(region.mean()) < 0.1 and 0.8 < region.std() < 1.2, identifier
        else:  # CT: clipped at the CT cases' 99.5th percentile, z-scored with the CT statistics
            ct = per_case["intensity_properties"]["0"]["CTNormalization"]
            assert data.max() <= (ct["percentile_99_5"] - ct["mean"]) / ct["std"] + 0.1

    assert "8 cases: 3 2D, 5 3D" in result.stdout
    assert (preprocessed / f"{DEFAULT_PLANS_NAME}_{PRETRAINING_CONFIGURATION}_cases.tsv").is_file()
