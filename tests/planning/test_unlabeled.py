"""Fingerprint, planner and preprocessor subclasses for unlabeled data, run in-process (no worker pool)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from planning_data import NnUNetDirs, make_volume_dataset, write_image

from nnssl_joint import __version__
from nnssl_joint.planning.errors import PlanningError, PreprocessingVerificationError
from nnssl_joint.planning.prepare import prepare_pretraining_dataset
from nnssl_joint.planning.raw import inspect_raw_dataset
from nnssl_joint.planning.settings import DEFAULT_PLANS_NAME, PRETRAINING_CONFIGURATION, SpacingSpec
from nnssl_joint.planning.unlabeled import (
    JointSSLPlanner,
    UnlabeledFingerprintExtractor,
    UnlabeledPreprocessor,
    verify_preprocessed,
)


def fingerprint_and_plan(name: str, spacing: str = "median") -> dict:
    UnlabeledFingerprintExtractor(name, num_processes=1).run(overwrite_existing=True)
    return JointSSLPlanner(name, spacing=spacing).plan_experiment()


def preprocess_in_process(dirs: NnUNetDirs, name: str) -> Path:
    """UnlabeledPreprocessor.run_case_save for every case, as nnU-Net's pool would call it (labels never
    exist)."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans_manager = PlansManager(str(dirs.preprocessed / name / f"{DEFAULT_PLANS_NAME}.json"))
    manager = plans_manager.get_configuration(PRETRAINING_CONFIGURATION)
    dataset_json = json.loads((dirs.preprocessed / name / "dataset.json").read_text())
    output = dirs.preprocessed / name / manager.data_identifier
    output.mkdir()
    preprocessor = UnlabeledPreprocessor(verbose=False)
    preprocessor.raw_dataset_folder = str(dirs.raw / name)
    for case in inspect_raw_dataset(dirs.raw / name).cases:
        missing_label = str(dirs.raw / name / "labelsTr" / f"{case.identifier}.nii.gz")
        preprocessor.run_case_save(str(output / case.identifier), list(case.files), missing_label,
                                   plans_manager, manager, dataset_json)
    return output


def load_case(folder: Path, identifier: str) -> tuple[np.ndarray, np.ndarray, dict]:
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2

    data, seg, _, properties = nnUNetDatasetBlosc2(str(folder)).load_case(identifier)
    return np.asarray(data[:]), np.asarray(seg[:]), properties


def test_fingerprint_without_labels(nnunet_dirs: NnUNetDirs, mr_volumes: Path) -> None:
    assert not (mr_volumes / "labelsTr").exists()
    fingerprint = UnlabeledFingerprintExtractor(501, num_processes=1).run(overwrite_existing=True)
    assert fingerprint["case_identifiers"] == ["case0", "case1", "case2"]
    assert np.allclose(fingerprint["spacings"], [[1, 1, 1], [3, 0.9, 0.9], [2, 0.8, 0.8]])
    # empty end slices are cropped, as nnU-Net does
    assert fingerprint["shapes_after_crop"][2][0] == 12 - 2 * 2
    stats = fingerprint["foreground_intensity_properties_per_channel"]["0"]
    assert 280 < stats["mean"] < 320 and stats["min"] > 0  # body voxels only, no background zeros
    assert fingerprint["intensity_properties_per_channel_and_scheme"]["0"]["ZScoreNormalization"] == stats
    assert 0 < fingerprint["median_relative_size_after_cropping"] < 1
    saved = json.loads(
        (nnunet_dirs.preprocessed / "Dataset501_MRVol" / "dataset_fingerprint.json").read_text())
    assert saved["spacings"] == fingerprint["spacings"]


def test_ct_statistics_leave_out_scanner_padding(nnunet_dirs: NnUNetDirs, ct_mha: Path) -> None:
    path = ct_mha / "imagesTr" / "case0_0000.mha"
    import SimpleITK as sitk

    volume = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    volume[:, :3, :3] = -3024  # outside the reconstructed field of view
    write_image(volume, path, (2.5, 0.7, 0.7))
    fingerprint = UnlabeledFingerprintExtractor(503, num_processes=1).run(overwrite_existing=True)
    assert fingerprint["foreground_intensity_properties_per_channel"]["0"]["min"] == -1000


def test_planner_writes_the_pretraining_configuration(nnunet_dirs: NnUNetDirs, mr_volumes: Path,
                                                      xray_pngs: Path) -> None:
    prepare_pretraining_dataset([501, 502], 900, "Joint")
    plans = fingerprint_and_plan("Dataset900_Joint")
    assert plans["plans_name"] == DEFAULT_PLANS_NAME
    assert list(plans["configurations"]) == [PRETRAINING_CONFIGURATION]
    assert plans["transpose_forward"] == [0, 1, 2] and plans["image_reader_writer"] == "SimpleITKIO"
    assert plans["nnssl_joint"]["version"] == __version__ and plans["nnssl_joint"]["spacing"] == "median"
    configuration = plans["configurations"][PRETRAINING_CONFIGURATION]
    assert configuration["data_identifier"] == f"{DEFAULT_PLANS_NAME}_{PRETRAINING_CONFIGURATION}"
    assert len(configuration["patch_size"]) == 2
    assert configuration["architecture"]["arch_kwargs"]["conv_op"] == "torch.nn.modules.conv.Conv2d"
    # median over the six cases' in-plane spacings: PNGs 1.0 (nnU-Net's value for PNG), MR 1.0 / 0.9 / 0.8
    assert configuration["spacing"] == pytest.approx([1.0, 1.0], abs=1e-6)
    assert configuration["spacing_mode"] == "median" and configuration["resample_in_plane"] is True
    assert configuration["normalization_schemes"] == ["ZScoreNormalization"]
    assert "per_case_normalization" not in configuration  # MR and X-ray are both z-scored
    preprocessed = nnunet_dirs.preprocessed / "Dataset900_Joint"
    assert json.loads((preprocessed / f"{DEFAULT_PLANS_NAME}.json").read_text())["configurations"]
    assert (preprocessed / "dataset.json").is_file() and (preprocessed / "provenance.json").is_file()


@pytest.mark.parametrize(("spec", "mode", "resamples", "spacing"), [
    ("0.5", "fixed", True, [0.5, 0.5]),
    ("native", "native", False, None),
])
def test_spacing_modes(nnunet_dirs: NnUNetDirs, mr_volumes: Path, spec: str, mode: str, resamples: bool,
                       spacing: list[float] | None) -> None:
    configuration = (fingerprint_and_plan("Dataset501_MRVol", spec)
                     ["configurations"][PRETRAINING_CONFIGURATION])
    assert configuration["spacing_mode"] == mode and configuration["resample_in_plane"] is resamples
    if spacing is not None:
        assert configuration["spacing"] == spacing


@pytest.mark.parametrize("bad", ["-1", "0", "abc", "nan"])
def test_invalid_spacing_is_refused(bad: str) -> None:
    with pytest.raises(PlanningError, match="Invalid spacing"):
        SpacingSpec.parse(bad)


def test_native_preprocessing_keeps_every_slice_and_pixel(nnunet_dirs: NnUNetDirs, mr_volumes: Path,
                                                          xray_pngs: Path) -> None:
    name = prepare_pretraining_dataset([501, 502], 900, "Joint").name
    fingerprint_and_plan(name, "native")
    output = preprocess_in_process(nnunet_dirs, name)

    provenance = json.loads((nnunet_dirs.raw / name / "provenance.json").read_text())["cases"]
    for identifier, record in provenance.items():
        data, seg, properties = load_case(output, identifier)
        cropped = tuple(properties["shape_after_cropping_and_before_resampling"])
        assert data.shape[1:] == cropped == seg.shape[1:]
        assert data.shape[1] == (1 if record["dim"] == 2
                                 else record["original_shape"][0] - 4 * (identifier == "D501_case2"))
        assert properties["class_locations"] == {}
        assert set(np.unique(seg)) <= {-1, 0}  # nnU-Net's nonzero mask stands in for the segmentation
        inside = seg[0] >= 0
        assert data[0][inside].mean() == pytest.approx(0, abs=1e-4)
        assert data[0][inside].std() == pytest.approx(1, abs=1e-3)

    rows = verify_preprocessed(name, deep=True)
    assert [r.dim for r in rows] == [3, 3, 3, 2, 2, 2]
    (output / "D502_img1.pkl").unlink()
    with pytest.raises(PreprocessingVerificationError, match="D502_img1"):
        verify_preprocessed(name)


def test_mixed_ct_and_mr_are_normalised_per_case(nnunet_dirs: NnUNetDirs, mr_volumes: Path,
                                                 ct_mha: Path) -> None:
    name = prepare_pretraining_dataset([501, 503], 900, "CTMR").name
    configuration = fingerprint_and_plan(name, "native")["configurations"][PRETRAINING_CONFIGURATION]
    per_case = configuration["per_case_normalization"]
    ct = per_case["intensity_properties"]["0"]["CTNormalization"]
    mr = per_case["intensity_properties"]["0"]["ZScoreNormalization"]
    assert ct["percentile_00_5"] == -1000 and ct["percentile_99_5"] > 500  # from the CT cases only
    assert 280 < mr["mean"] < 320  # from the MR cases only
    assert per_case["use_mask_for_norm"]["0"]["CTNormalization"] is False

    output = preprocess_in_process(nnunet_dirs, name)
    import SimpleITK as sitk
    from nnunetv2.preprocessing.cropping.cropping import crop_to_nonzero

    raw = sitk.GetArrayFromImage(
        sitk.ReadImage(str(nnunet_dirs.raw / name / "imagesTr" / "D503_case1_0000.nii.gz")))
    expected = crop_to_nonzero(raw[None].astype(np.float32))[0][0]
    expected = (np.clip(expected, ct["percentile_00_5"], ct["percentile_99_5"]) - ct["mean"]) / ct["std"]
    data, _, _ = load_case(output, "D503_case1")
    np.testing.assert_allclose(data[0], expected, rtol=1e-5, atol=1e-5)

    data, seg, _ = load_case(output, "D501_case0")
    region = seg[0] >= 0 if per_case["use_mask_for_norm"]["0"]["ZScoreNormalization"] else slice(None)
    assert data[0][region].mean() == pytest.approx(0, abs=1e-4)
    assert data[0][region].std() == pytest.approx(1, abs=1e-3)


def test_ct_only_dataset_uses_nnunet_ct_normalisation(nnunet_dirs: NnUNetDirs, ct_mha: Path) -> None:
    configuration = fingerprint_and_plan("Dataset503_CTMha")["configurations"][PRETRAINING_CONFIGURATION]
    assert configuration["normalization_schemes"] == ["CTNormalization"]
    assert "per_case_normalization" not in configuration


def test_volume_sliced_off_its_coarse_axis_warns(nnunet_dirs: NnUNetDirs) -> None:
    make_volume_dataset(nnunet_dirs.raw, 507, "Sagittal", [((20, 24, 6), (0.8, 0.8, 4.0))] * 2)
    UnlabeledFingerprintExtractor(507, num_processes=1).run(overwrite_existing=True)
    with pytest.warns(UserWarning, match="coarsest spacing in-plane"):
        JointSSLPlanner(507).plan_experiment()
