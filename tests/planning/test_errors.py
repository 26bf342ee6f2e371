"""Every input error of prepare / plan_and_preprocess: a clear message naming the culprit, nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from planning_data import NnUNetDirs, make_png_dataset, make_volume_dataset, write_image

from nnssl_joint.errors import NnsslJointError
from nnssl_joint.naming import NnUNetPathError
from nnssl_joint.planning.errors import (
    ChannelCountMismatchError,
    ChannelFileError,
    ColorImageError,
    DatasetJsonError,
    DatasetNotFoundError,
    EmptyDatasetError,
    ImageReadError,
    NonFiniteImageError,
    PlanningError,
    TargetExistsError,
)
from nnssl_joint.planning.prepare import prepare_pretraining_dataset

TARGET = 900


def assert_nothing_written(raw: Path) -> None:
    """No target dataset and no leftover temporary folder in nnUNet_raw."""
    leftovers = [p.name for p in raw.iterdir() if p.name.startswith((f"Dataset{TARGET}_",
                                                                     f".Dataset{TARGET}_"))]
    assert leftovers == []


def prepare_fails(raw: Path, error: type[Exception], *fragments: str, sources=(501,)) -> str:
    with pytest.raises(error) as info:
        prepare_pretraining_dataset(list(sources), TARGET, "Merged")
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    assert isinstance(info.value, NnsslJointError)
    assert_nothing_written(raw)
    return message


def test_missing_dataset_json(nnunet_dirs: NnUNetDirs, mr_volumes: Path) -> None:
    (mr_volumes / "dataset.json").unlink()
    prepare_fails(nnunet_dirs.raw, DatasetJsonError, str(mr_volumes / "dataset.json"), "does not exist")


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ('{"channel_names": {"0": "MR"}, "file_ending": ".nii.gz",}', "not valid JSON"),
        ('{"labels": {"background": 0}, "file_ending": ".nii.gz"}', "no 'channel_names' key"),
        ('{"channel_names": {"0": "MR"}, "numTraining": 3}', "no 'file_ending' key"),
    ],
    ids=["invalid-json", "no-channel-names", "no-file-ending"],
)
def test_malformed_dataset_json(nnunet_dirs: NnUNetDirs, mr_volumes: Path, content: str,
                                fragment: str) -> None:
    (mr_volumes / "dataset.json").write_text(content)
    prepare_fails(nnunet_dirs.raw, DatasetJsonError, str(mr_volumes / "dataset.json"), fragment)


def test_case_without_channel_0000(nnunet_dirs: NnUNetDirs, mr_volumes: Path) -> None:
    images = mr_volumes / "imagesTr"
    (images / "case1_0000.nii.gz").rename(images / "case1_0001.nii.gz")
    prepare_fails(nnunet_dirs.raw, ChannelFileError, "missing case1_0000.nii.gz", "found case1_0001.nii.gz")


def test_second_declared_channel_missing(nnunet_dirs: NnUNetDirs, mr_volumes: Path) -> None:
    dataset_json = json.loads((mr_volumes / "dataset.json").read_text())
    dataset_json["channel_names"] = {"0": "T1", "1": "T2"}
    (mr_volumes / "dataset.json").write_text(json.dumps(dataset_json))
    prepare_fails(nnunet_dirs.raw, ChannelFileError, "missing case0_0001.nii.gz", "declares (channel_names")


def test_misnamed_file(nnunet_dirs: NnUNetDirs, mr_volumes: Path) -> None:
    (mr_volumes / "imagesTr" / "case2_0000.nii.gz").rename(mr_volumes / "imagesTr" / "case2.nii.gz")
    prepare_fails(nnunet_dirs.raw, ChannelFileError, "case2.nii.gz", "CASE_XXXX.nii.gz")


def test_truncated_image_is_named(nnunet_dirs: NnUNetDirs, mr_volumes: Path) -> None:
    broken = mr_volumes / "imagesTr" / "case1_0000.nii.gz"
    broken.write_bytes(broken.read_bytes()[:200])
    prepare_fails(nnunet_dirs.raw, ImageReadError, f"Image file {broken} is truncated", "case1")


@pytest.mark.parametrize("bad_value", [np.nan, np.inf])
def test_non_finite_voxels_are_named(nnunet_dirs: NnUNetDirs, ct_mha: Path, bad_value: float) -> None:
    # .mha: SimpleITK's NIfTI reader turns NaN into 0 itself, MetaImage keeps it
    volume = np.ones((4, 8, 8), np.float32)
    volume[2, 3, 3] = bad_value
    bad = ct_mha / "imagesTr" / "case1_0000.mha"
    write_image(volume, bad)
    prepare_fails(nnunet_dirs.raw, NonFiniteImageError, str(bad), "NaN", sources=(503,))


def test_mixed_channel_counts_name_the_datasets(nnunet_dirs: NnUNetDirs, mr_volumes: Path) -> None:
    two = make_volume_dataset(nnunet_dirs.raw, 504, "TwoChannels", [((4, 8, 8), (1, 1, 1))])
    write_image(np.ones((4, 8, 8), np.float32), two / "imagesTr" / "case0_0001.nii.gz")
    dataset_json = json.loads((two / "dataset.json").read_text())
    dataset_json["channel_names"] = {"0": "T1", "1": "T2"}
    (two / "dataset.json").write_text(json.dumps(dataset_json))
    prepare_fails(nnunet_dirs.raw, ChannelCountMismatchError, "Dataset501_MRVol: 1",
                  "Dataset504_TwoChannels: 2", sources=(501, 504))


def test_empty_dataset(nnunet_dirs: NnUNetDirs, mr_volumes: Path) -> None:
    for f in (mr_volumes / "imagesTr").iterdir():
        f.unlink()
    prepare_fails(nnunet_dirs.raw, EmptyDatasetError, "Dataset501_MRVol is empty",
                  "no files ending in .nii.gz")


def test_unknown_dataset_id_names_id_and_folder(nnunet_dirs: NnUNetDirs, mr_volumes: Path) -> None:
    prepare_fails(nnunet_dirs.raw, DatasetNotFoundError, "No dataset with id 777", "Dataset777_<name>",
                  str(nnunet_dirs.raw), "Dataset501_MRVol", sources=(501, 777))


def test_unset_environment_variable_is_named(nnunet_dirs: NnUNetDirs, mr_volumes: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("nnUNet_raw")
    with pytest.raises(NnUNetPathError, match="nnUNet_raw is not set"):
        prepare_pretraining_dataset([501], TARGET, "Merged")
    assert_nothing_written(nnunet_dirs.raw)


def test_colour_png_in_one_channel_dataset(nnunet_dirs: NnUNetDirs) -> None:
    folder = make_png_dataset(nnunet_dirs.raw, 501, "Fundus", rgb="colour")
    prepare_fails(nnunet_dirs.raw, ColorImageError, str(folder / "imagesTr" / "img0_0000.png"),
                  "convert('L')")


def test_existing_target_needs_overwrite(nnunet_dirs: NnUNetDirs, mr_volumes: Path) -> None:
    existing = nnunet_dirs.raw / f"Dataset{TARGET}_Old"
    existing.mkdir()
    with pytest.raises(TargetExistsError, match="--overwrite"):
        prepare_pretraining_dataset([501], TARGET, "Merged")
    assert sorted(p.name for p in nnunet_dirs.raw.iterdir()) == ["Dataset501_MRVol", f"Dataset{TARGET}_Old"]


def test_target_id_equal_to_a_source(nnunet_dirs: NnUNetDirs, mr_volumes: Path) -> None:
    with pytest.raises(TargetExistsError, match="also a source"):
        prepare_pretraining_dataset([501], 501, "Merged", overwrite=True)


def test_invalid_name(nnunet_dirs: NnUNetDirs, mr_volumes: Path) -> None:
    with pytest.raises(PlanningError, match="Invalid dataset name 'my data'"):
        prepare_pretraining_dataset([501], TARGET, "my data")
    assert_nothing_written(nnunet_dirs.raw)


def test_plan_and_preprocess_failure_leaves_no_preprocessed_folder(nnunet_dirs: NnUNetDirs,
                                                                   mr_volumes: Path) -> None:
    from nnssl_joint.planning.unlabeled import plan_and_preprocess_unlabeled

    broken = mr_volumes / "imagesTr" / "case2_0000.nii.gz"
    broken.write_bytes(broken.read_bytes()[:100])
    with pytest.raises(ImageReadError, match=str(broken)):
        plan_and_preprocess_unlabeled(501, num_processes=1, num_processes_fingerprint=1)
    assert list(nnunet_dirs.preprocessed.iterdir()) == []


def test_plan_and_preprocess_unknown_id(nnunet_dirs: NnUNetDirs) -> None:
    from nnssl_joint.planning.unlabeled import plan_and_preprocess_unlabeled

    with pytest.raises(DatasetNotFoundError, match="No dataset with id 42"):
        plan_and_preprocess_unlabeled(42, num_processes=1, num_processes_fingerprint=1)
    assert list(nnunet_dirs.preprocessed.iterdir()) == []


@pytest.mark.parametrize("ending", [".nii", ".mha"])
def test_truncated_uncompressed_image_is_named(nnunet_dirs: NnUNetDirs, ending: str) -> None:
    folder = make_volume_dataset(nnunet_dirs.raw, 501, "Plain", [((6, 16, 16), (1, 1, 1))] * 2,
                                 file_ending=ending)
    broken = folder / "imagesTr" / f"case1_0000{ending}"
    broken.write_bytes(broken.read_bytes()[:-500])
    prepare_fails(nnunet_dirs.raw, ImageReadError, str(broken))


def test_unreadable_file_is_named(nnunet_dirs: NnUNetDirs, mr_volumes: Path) -> None:
    broken = mr_volumes / "imagesTr" / "case0_0000.nii.gz"
    broken.write_bytes(b"not an image at all")
    prepare_fails(nnunet_dirs.raw, ImageReadError, str(broken))


def test_listed_dataset_without_label_entries_cannot_be_planned(nnunet_dirs: NnUNetDirs,
                                                                mr_volumes: Path) -> None:
    from nnssl_joint.planning.unlabeled import plan_and_preprocess_unlabeled

    dataset_json = json.loads((mr_volumes / "dataset.json").read_text())
    dataset_json["dataset"] = {"case0": {"images": ["imagesTr/case0_0000.nii.gz"]}}
    (mr_volumes / "dataset.json").write_text(json.dumps(dataset_json))
    with pytest.raises(DatasetJsonError, match="no 'label' entry"):
        plan_and_preprocess_unlabeled(501, num_processes=1, num_processes_fingerprint=1)
    assert list(nnunet_dirs.preprocessed.iterdir()) == []
