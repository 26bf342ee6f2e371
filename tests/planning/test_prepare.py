"""nnssl_joint prepare: merging 2D and 3D raw datasets into one pretraining dataset."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from planning_data import NnUNetDirs, make_png_dataset, write_dataset_json, write_image

from nnssl_joint import __version__
from nnssl_joint.planning.prepare import merged_channel_names, prepare_pretraining_dataset
from nnssl_joint.planning.raw import SLICE_SPACING_2D, RawDataset


def read(path: Path) -> tuple[np.ndarray, tuple[float, ...], sitk.Image]:
    image = sitk.ReadImage(str(path))
    return sitk.GetArrayFromImage(image), image.GetSpacing(), image


def test_merge_2d_and_3d_sources(nnunet_dirs: NnUNetDirs, mr_volumes: Path, xray_pngs: Path,
                                 ct_mha: Path) -> None:
    target = prepare_pretraining_dataset([501, 502, 503], 900, "JointPretrain")
    assert target == nnunet_dirs.raw / "Dataset900_JointPretrain"

    dataset_json = json.loads((target / "dataset.json").read_text())
    assert dataset_json["file_ending"] == ".nii.gz"
    assert dataset_json["labels"] == {"background": 0}
    assert dataset_json["numTraining"] == 8
    assert dataset_json["channel_names"] == {"0": "mixed_MR_Xray_CT"}
    assert not (target / "labelsTr").exists()

    files = sorted(p.name for p in (target / "imagesTr").iterdir())
    assert files == [f"D501_case{i}_0000.nii.gz" for i in range(3)] \
        + [f"D502_img{i}_0000.nii.gz" for i in range(3)] + [f"D503_case{i}_0000.nii.gz" for i in range(2)]

    provenance = json.loads((target / "provenance.json").read_text())
    assert provenance["nnssl_joint_version"] == __version__
    assert set(provenance["sources"]) == {"Dataset501_MRVol", "Dataset502_XrayPng", "Dataset503_CTMha"}
    cases = provenance["cases"]
    assert set(cases) == {f[: -len("_0000.nii.gz")] for f in files}

    mr1 = cases["D501_case1"]
    assert mr1["source_dataset"] == "Dataset501_MRVol" and mr1["source_case"] == "case1"
    assert mr1["source_files"] == [str(mr_volumes / "imagesTr" / "case1_0000.nii.gz")]
    assert mr1["dim"] == 3 and mr1["original_shape"] == [8, 24, 24]
    assert mr1["original_spacing"] == pytest.approx([3.0, 0.9, 0.9])
    assert mr1["channel_names"] == {"0": "MR"}
    data, spacing, _ = read(target / "imagesTr" / "D501_case1_0000.nii.gz")
    source, _, _ = read(mr_volumes / "imagesTr" / "case1_0000.nii.gz")
    np.testing.assert_array_equal(data, source)
    assert spacing == pytest.approx((0.9, 0.9, 3.0))

    png = cases["D502_img0"]
    assert png["dim"] == 2 and png["original_shape"] == [1, 32, 32] and png["channel_names"] == {"0": "Xray"}
    data, spacing, _ = read(target / "imagesTr" / "D502_img0_0000.nii.gz")
    assert data.shape == (1, 32, 32) and data.dtype == np.uint8
    assert spacing == pytest.approx((1.0, 1.0, SLICE_SPACING_2D))

    ct, _, _ = read(target / "imagesTr" / "D503_case0_0000.nii.gz")
    assert ct.dtype == np.int16 and ct.min() == -1000
    assert cases["D503_case0"]["channel_names"] == {"0": "CT"}


def test_single_slice_nifti_becomes_2d_and_geometry_of_volumes_is_kept(nnunet_dirs: NnUNetDirs) -> None:
    folder = nnunet_dirs.raw / "Dataset505_Mixed"
    (folder / "imagesTr").mkdir(parents=True)
    write_image(np.arange(1, 1 + 20 * 30, dtype=np.float32).reshape(1, 20, 30),
                folder / "imagesTr" / "slice_0000.nii.gz", (4.0, 0.5, 0.6))
    volume = sitk.GetImageFromArray(np.ones((5, 6, 7), np.float32))
    volume.SetSpacing((0.6, 0.5, 2.0))
    volume.SetOrigin((10.0, -20.0, 30.0))
    volume.SetDirection((0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0))
    sitk.WriteImage(volume, str(folder / "imagesTr" / "vol_0000.nii.gz"))
    write_dataset_json(folder, {"0": "T1"}, ".nii.gz", 2)

    target = prepare_pretraining_dataset([505], 901, "Single")
    cases = json.loads((target / "provenance.json").read_text())["cases"]
    assert cases["D505_slice"]["dim"] == 2
    assert cases["D505_slice"]["original_spacing"] == pytest.approx([4.0, 0.5, 0.6])
    data, spacing, _ = read(target / "imagesTr" / "D505_slice_0000.nii.gz")
    assert data.shape == (1, 20, 30) and spacing == pytest.approx((0.6, 0.5, SLICE_SPACING_2D))
    _, spacing, image = read(target / "imagesTr" / "D505_vol_0000.nii.gz")
    assert spacing == pytest.approx((0.6, 0.5, 2.0))
    assert image.GetOrigin() == pytest.approx((10.0, -20.0, 30.0))
    assert image.GetDirection() == pytest.approx((0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0))


def test_grey_png_saved_as_rgb_becomes_one_channel_with_a_warning(nnunet_dirs: NnUNetDirs) -> None:
    make_png_dataset(nnunet_dirs.raw, 506, "GreyAsRgb", n=2, rgb="grey")
    with pytest.warns(UserWarning, match="identical colour channels"):
        target = prepare_pretraining_dataset([506], 902, "Grey")
    data, _, _ = read(target / "imagesTr" / "D506_img0_0000.nii.gz")
    assert data.shape == (1, 32, 32)


def test_overwrite_replaces_an_existing_target(nnunet_dirs: NnUNetDirs, mr_volumes: Path,
                                               xray_pngs: Path) -> None:
    prepare_pretraining_dataset([501, 502], 900, "First")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        target = prepare_pretraining_dataset([502], 900, "Second", overwrite=True)
    datasets = sorted(p.name for p in nnunet_dirs.raw.iterdir())
    assert datasets == ["Dataset501_MRVol", "Dataset502_XrayPng", "Dataset900_Second"]
    assert json.loads((target / "dataset.json").read_text())["numTraining"] == 3


def test_channel_names_agreeing_case_insensitively_are_not_mixed() -> None:
    def source(*names: str) -> RawDataset:
        channel_names = {str(i): n for i, n in enumerate(names)}
        return RawDataset(1, "Dataset001_X", Path("."),
                          {"channel_names": channel_names, "file_ending": ".nii.gz"}, [])

    assert merged_channel_names([source("CT", "MR"), source("ct", "MR")]) == {"0": "CT", "1": "MR"}
    assert merged_channel_names([source("CT"), source("MR"), source("ct")]) == {"0": "mixed_CT_MR"}


def test_dataset_listed_in_dataset_json(nnunet_dirs: NnUNetDirs) -> None:
    """nnU-Net's alternative layout: files listed under "dataset" in dataset.json instead of imagesTr
    naming."""
    folder = nnunet_dirs.raw / "Dataset508_Listed"
    (folder / "scans").mkdir(parents=True)
    write_image(np.ones((3, 8, 8), np.float32), folder / "scans" / "a.nii.gz")
    dataset_json = {"channel_names": {"0": "MR"}, "labels": {"background": 0}, "numTraining": 1,
                    "file_ending": ".nii.gz", "dataset": {"subject_a": {"images": ["scans/a.nii.gz"]}}}
    (folder / "dataset.json").write_text(json.dumps(dataset_json))
    target = prepare_pretraining_dataset([508], 903, "Listed")
    assert (target / "imagesTr" / "D508_subject_a_0000.nii.gz").is_file()
