"""Tests of the synthetic nnU-Net raw dataset generator (nnssl_joint/datasets/synthetic.py)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnssl_joint.datasets.synthetic import (
    DEFAULT_NAMES,
    MAX_ORGANS,
    SLICE_SPACING_2D,
    gaussian_blur,
    make_image_case,
    make_synthetic,
    make_volume_case,
    organ_labels,
    register_cli,
    smooth_noise,
    write_labeled_3d,
    write_unlabeled_2d,
    write_unlabeled_3d,
)

# non-cubic so that any mix-up of the (z, y, x) and (x, y, z) orders shows
SHAPE_3D = (20, 28, 36)
SHAPE_2D = (40, 48)
IDS = (901, 902, 903)
SMALL = {"seed": 3, "n_3d": 3, "n_2d": 4, "n_labeled_train": 3, "n_labeled_test": 2, "shape_3d": SHAPE_3D,
         "shape_2d": SHAPE_2D, "ids": IDS}


def _read(path: Path) -> tuple[np.ndarray, tuple[float, ...]]:
    """Array (z, y, x) and spacing (z, y, x) of an image file."""
    image = sitk.ReadImage(str(path))
    return sitk.GetArrayFromImage(image), tuple(image.GetSpacing()[::-1])


def _best_threshold_dice(image: np.ndarray, mask: np.ndarray) -> float:
    """Highest Dice of ``image > t`` or ``image < t`` with ``mask`` over every threshold t."""
    values, target = image.ravel(), mask.ravel()
    best = 0.0
    for order in (np.argsort(-values, kind="stable"), np.argsort(values, kind="stable")):
        true_positives = np.cumsum(target[order])
        predicted = np.arange(1, values.size + 1)
        best = max(best, float(np.max(2.0 * true_positives / (predicted + target.sum()))))
    return best


@pytest.fixture(scope="module")
def synthetic_root(module_tmp_path: Path) -> tuple[Path, dict]:
    root = module_tmp_path / "raw"
    root.mkdir()
    return root, make_synthetic(root, **SMALL)


# ----------------------------------------------------------------------------------------------------
# generative model


def test_volume_case_is_deterministic_per_seed():
    a = make_volume_case(np.random.default_rng(7), (16, 24, 20))
    b = make_volume_case(np.random.default_rng(7), (16, 24, 20))
    c = make_volume_case(np.random.default_rng(8), (16, 24, 20))
    assert a[0].tobytes() == b[0].tobytes() and a[1].tobytes() == b[1].tobytes() and a[2] == b[2]
    assert not np.array_equal(a[0], c[0])
    image, label, spacing = a
    assert image.dtype == np.float32 and label.dtype == np.uint8
    assert image.shape == label.shape == (16, 24, 20) and len(spacing) == 3
    assert np.isfinite(image).all()


@pytest.mark.parametrize("n_organs", [1, 3, MAX_ORGANS])
def test_volume_case_contains_every_organ(n_organs: int):
    for seed in range(3):
        _, label, _ = make_volume_case(np.random.default_rng(seed), (24, 24, 24), n_organs=n_organs)
        assert set(np.unique(label)) == set(range(n_organs + 1))


def test_named_organs_choose_the_labels_and_keep_the_default_draws():
    """Named organs label only those (in the given order); the first-n form is unchanged by the option."""
    names = ("liver_like", "kidney_like", "vessel_like")
    assert organ_labels(names) == {"background": 0, "liver_like": 1, "kidney_like": 2, "vessel_like": 3}
    for seed in range(3):
        _, label, _ = make_volume_case(np.random.default_rng(seed), (24, 24, 24), organs=names)
        assert set(np.unique(label)) == {0, 1, 2, 3}
    default = make_volume_case(np.random.default_rng(4), (16, 24, 20))
    first_three = make_volume_case(np.random.default_rng(4), (16, 24, 20),
                                   organs=("liver_like", "lesion_like", "kidney_like"))
    assert all(a.tobytes() == b.tobytes() for a, b in zip(default[:2], first_three[:2]))
    # the nested organ is placed inside its parent, re-indexed into the selection
    _, label, _ = make_volume_case(np.random.default_rng(0), (24, 24, 24),
                                   organs=("kidney_like", "liver_like", "lesion_like"))
    assert set(np.unique(label)) == {0, 1, 2, 3}
    with pytest.raises(ValueError, match="'lesion_like' lies inside 'liver_like'"):
        organ_labels(("lesion_like", "liver_like"))
    with pytest.raises(ValueError, match="spleen_like"):
        organ_labels(("liver_like", "spleen_like"))
    assert organ_labels("kidney_like") == {"background": 0, "kidney_like": 1}  # one name, not its letters


def test_anisotropic_spacing_is_thick_in_z():
    _, _, (z, y, x) = make_volume_case(np.random.default_rng(0), (16, 16, 16), anisotropic=True)
    assert y == x and 2.0 <= z / x <= 3.0
    _, _, (z, y, x) = make_volume_case(np.random.default_rng(0), (16, 16, 16), anisotropic=False)
    assert z == y == x
    _, _, spacing = make_volume_case(np.random.default_rng(0), (16, 16, 16), spacing=(3.0, 0.5, 0.7))
    assert spacing == (3.0, 0.5, 0.7)


def test_ct_modality_is_in_hounsfield_units():
    image, _, _ = make_volume_case(np.random.default_rng(0), (16, 24, 24), modality="CT")
    assert -1200 < np.percentile(image, 1) < -800  # air
    assert -100 < np.median(image[image > -500]) < 200  # soft tissue


def test_organs_are_not_recoverable_by_a_global_threshold():
    """The "hard enough" check: no single intensity threshold segments an organ, raw or denoised."""
    for seed in range(3):
        image, label, _ = make_volume_case(np.random.default_rng(seed), (32, 32, 32), n_organs=MAX_ORGANS)
        denoised = gaussian_blur(image, (1.0, 1.0, 1.0))
        for organ in range(1, MAX_ORGANS + 1):
            mask = label == organ
            assert _best_threshold_dice(image, mask) < 0.9, (seed, organ)
            assert _best_threshold_dice(denoised, mask) < 0.9, (seed, organ)


@pytest.mark.parametrize("kind", ["slice", "texture"])
def test_image_case(kind: str):
    a = make_image_case(np.random.default_rng(1), SHAPE_2D, kind)
    b = make_image_case(np.random.default_rng(1), SHAPE_2D, kind)
    c = make_image_case(np.random.default_rng(2), SHAPE_2D, kind)
    assert a.shape == SHAPE_2D and a.dtype == np.float32 and np.isfinite(a).all()
    assert a.tobytes() == b.tobytes() and not np.array_equal(a, c)
    assert a.std() > 0


def test_invalid_arguments_name_the_fix():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="kind must be one of"):
        make_image_case(rng, SHAPE_2D, "photo")
    with pytest.raises(ValueError, match="n_organs must be between 1 and"):
        make_volume_case(rng, n_organs=MAX_ORGANS + 1)
    with pytest.raises(ValueError, match="shape must have 3 entries"):
        make_volume_case(rng, shape=(32, 32))
    with pytest.raises(ValueError, match="file_ending must be one of"):
        write_unlabeled_3d("/nonexistent", 950, "X", 1, file_ending=".png")


def test_smooth_noise_is_standardised_and_smooth():
    field = smooth_noise(np.random.default_rng(0), (8, 64, 64), (1.0, 6.0, 6.0))
    assert field.shape == (8, 64, 64) and field.dtype == np.float32
    assert abs(field.mean()) < 1e-4 and abs(field.std() - 1.0) < 1e-4
    neighbour_correlation = np.corrcoef(field[:, :, :-1].ravel(), field[:, :, 1:].ravel())[0, 1]
    assert neighbour_correlation > 0.9


# ----------------------------------------------------------------------------------------------------
# datasets on disk, read back with nnU-Net


def test_dataset_folders_and_json(synthetic_root):
    root, result = synthetic_root
    assert set(result) == {"unlabeled_3d", "unlabeled_2d", "labeled_3d"}
    for (kind, info), dataset_id, name in zip(result.items(), IDS, DEFAULT_NAMES):
        assert info["path"] == root / f"Dataset{dataset_id}_{name}" and info["written"]
        dataset_json = json.loads((info["path"] / "dataset.json").read_text())
        for key in ("channel_names", "labels", "numTraining", "file_ending"):
            assert key in dataset_json
        assert dataset_json["channel_names"] == {"0": "MRI"}
        assert dataset_json["labels"]["background"] == 0
        assert dataset_json["synthetic"]["kind"] == kind
    labeled = json.loads((result["labeled_3d"]["path"] / "dataset.json").read_text())
    assert labeled["labels"] == organ_labels(3) and labeled["numTraining"] == 3 and not labeled["unlabeled"]
    unlabeled = json.loads((result["unlabeled_3d"]["path"] / "dataset.json").read_text())
    assert unlabeled["labels"] == {"background": 0} and unlabeled["unlabeled"]
    assert not (result["unlabeled_3d"]["path"] / "labelsTr").exists()


def test_nnunet_finds_datasets_and_cases(synthetic_root, monkeypatch):
    from nnunetv2.utilities.dataset_name_id_conversion import convert_id_to_dataset_name
    from nnunetv2.utilities.utils import (
        get_filenames_of_train_images_and_targets,
        get_identifiers_from_splitted_dataset_folder,
    )

    root, result = synthetic_root
    monkeypatch.setenv("nnUNet_raw", str(root))
    for info in result.values():
        assert convert_id_to_dataset_name(info["id"]) == info["name"]
    labeled = result["labeled_3d"]["path"]
    dataset = get_filenames_of_train_images_and_targets(str(labeled))
    assert sorted(dataset) == [f"{DEFAULT_NAMES[2]}_{i:03d}" for i in range(3)]
    for case in dataset.values():
        assert len(case["images"]) == 1 and Path(case["images"][0]).is_file() \
            and Path(case["label"]).is_file()
    test_ids = get_identifiers_from_splitted_dataset_folder(str(labeled / "imagesTs"), ".nii.gz")
    assert list(test_ids) == [f"{DEFAULT_NAMES[2]}_{i:03d}" for i in (3, 4)]
    assert sorted(p.name for p in (labeled / "labelsTs").iterdir()) == [f"{i}.nii.gz" for i in test_ids]
    unlabeled_ids = get_identifiers_from_splitted_dataset_folder(
        str(result["unlabeled_2d"]["path"] / "imagesTr"), ".png")
    assert len(unlabeled_ids) == 4


def test_simpleitkio_reads_volumes_with_nnunet_spacing(synthetic_root):
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    _, result = synthetic_root
    folder = result["labeled_3d"]["path"]
    io = SimpleITKIO()
    ratios = []
    for i in range(3):
        case = f"{DEFAULT_NAMES[2]}_{i:03d}"
        image, properties = io.read_images([str(folder / "imagesTr" / f"{case}_0000.nii.gz")])
        seg, seg_properties = io.read_seg(str(folder / "labelsTr" / f"{case}.nii.gz"))
        assert image.shape == seg.shape == (1, *SHAPE_3D)  # SHAPE_3D[0] slices
        spacing = properties["spacing"]
        assert np.allclose(spacing, seg_properties["spacing"])
        assert np.allclose(spacing, properties["sitk_stuff"]["spacing"][::-1])
        assert spacing[1] == pytest.approx(spacing[2])
        ratios.append(spacing[0] / spacing[1])
        # training cases contain every organ
        assert set(np.unique(seg).astype(int)) == {0, 1, 2, 3}
    assert min(ratios) == pytest.approx(1.0) and 2.0 <= max(ratios) <= 3.0


def test_unlabeled_3d_pool_is_readable(synthetic_root):
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    _, result = synthetic_root
    files = sorted((result["unlabeled_3d"]["path"] / "imagesTr").iterdir())
    assert [f.name for f in files] == [f"{DEFAULT_NAMES[0]}_{i:03d}_0000.nii.gz" for i in range(3)]
    image, properties = SimpleITKIO().read_images([str(files[1])])
    assert image.shape == (1, *SHAPE_3D) and properties["spacing"][0] >= 2 * properties["spacing"][1]


def test_png_images_read_as_one_slice(synthetic_root):
    from nnunetv2.imageio.natural_image_reader_writer import NaturalImage2DIO

    _, result = synthetic_root
    files = sorted((result["unlabeled_2d"]["path"] / "imagesTr").glob("*_0000.png"))
    assert len(files) == 4
    for f in files:
        image, properties = NaturalImage2DIO().read_images([str(f)])
        assert image.shape == (1, 1, *SHAPE_2D) and properties["spacing"] == (999, 1, 1)
        assert image.min() == 0 and image.max() == 255


def test_single_slice_nifti_2d(tmp_path):
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    folder = write_unlabeled_2d(tmp_path, 904, "Slices", 2, SHAPE_2D, seed=0, file_ending=".nii.gz")
    image, properties = SimpleITKIO().read_images([str(folder / "imagesTr" / "Slices_000_0000.nii.gz")])
    assert image.shape == (1, 1, *SHAPE_2D)
    assert properties["spacing"] == [SLICE_SPACING_2D, 1.0, 1.0]


def test_uint16_png(tmp_path):
    folder = write_unlabeled_2d(tmp_path, 905, "Png16", 1, SHAPE_2D, seed=0, png_dtype="uint16")
    array = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "imagesTr" / "Png16_000_0000.png")))
    assert array.dtype == np.uint16 and array.shape == SHAPE_2D and array.max() == 65535


@pytest.mark.parametrize("file_ending", [".nrrd", ".mha"])
def test_other_3d_file_endings(tmp_path, file_ending: str):
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    folder = write_labeled_3d(tmp_path, 906, "Ending", 2, 0, (12, 16, 20), seed=0, n_organs=2,
                              file_ending=file_ending)
    image, properties = SimpleITKIO().read_images(
        [str(folder / "imagesTr" / f"Ending_001_0000{file_ending}")])
    seg, _ = SimpleITKIO().read_seg(str(folder / "labelsTr" / f"Ending_001{file_ending}"))
    assert image.shape == seg.shape == (1, 12, 16, 20) and properties["spacing"][0] > properties["spacing"][1]
    assert json.loads((folder / "dataset.json").read_text())["file_ending"] == file_ending


def test_written_cases_are_deterministic_and_independent_of_count(tmp_path, synthetic_root):
    _, result = synthetic_root
    again = write_labeled_3d(tmp_path, IDS[2], DEFAULT_NAMES[2], 2, 0, SHAPE_3D, seed=SMALL["seed"])
    for sub, suffix in (("imagesTr", "_0000"), ("labelsTr", "")):
        for i in range(2):
            name = f"{DEFAULT_NAMES[2]}_{i:03d}{suffix}.nii.gz"
            a, spacing_a = _read(result["labeled_3d"]["path"] / sub / name)
            b, spacing_b = _read(again / sub / name)
            assert a.tobytes() == b.tobytes() and spacing_a == spacing_b
    other = write_labeled_3d(tmp_path, 907, DEFAULT_NAMES[2], 1, 0, SHAPE_3D, seed=SMALL["seed"] + 1)
    a, _ = _read(again / "imagesTr" / f"{DEFAULT_NAMES[2]}_000_0000.nii.gz")
    b, _ = _read(other / "imagesTr" / f"{DEFAULT_NAMES[2]}_000_0000.nii.gz")
    assert not np.array_equal(a, b)


# ----------------------------------------------------------------------------------------------------
# overwrite protection and command line


def test_overwrite_protection(tmp_path):
    params = dict(SMALL, n_3d=1, n_2d=1, n_labeled_train=1, n_labeled_test=0, shape_3d=(12, 12, 12),
                  shape_2d=(16, 16))
    first = make_synthetic(tmp_path, **params)
    assert all(info["written"] for info in first.values())
    assert not any(info["written"] for info in make_synthetic(tmp_path, **params).values())

    changed = dict(params, seed=params["seed"] + 1)
    with pytest.raises(FileExistsError, match=r"Dataset901_SynthUnlabeled3D.*--overwrite"):
        make_synthetic(tmp_path, **changed)
    replaced = make_synthetic(tmp_path, **changed, overwrite=True)
    assert all(info["written"] for info in replaced.values())
    assert json.loads((replaced["labeled_3d"]["path"] / "dataset.json").read_text())["synthetic"]["seed"] == 4

    # a folder this generator did not write is never taken as up to date
    (replaced["unlabeled_2d"]["path"] / "dataset.json").unlink()
    with pytest.raises(FileExistsError, match="Dataset902_SynthUnlabeled2D"):
        make_synthetic(tmp_path, **changed)
    # a refused run writes nothing, not even the folders that could have been written
    assert not (replaced["unlabeled_2d"]["path"] / "dataset.json").exists()

    (tmp_path / "Dataset903_SomethingElse").mkdir()
    with pytest.raises(FileExistsError, match="Dataset903_SomethingElse.*--ids"):
        make_synthetic(tmp_path, **changed, overwrite=True)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nnssl_joint")
    register_cli(parser.add_subparsers(dest="command", required=True))
    return parser


def test_cli_writes_and_refuses(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("nnUNet_raw", raising=False)
    argv = ["make-synthetic", "--n-3d", "1", "--n-2d", "1", "--n-train", "1", "--n-test", "1",
            "--shape-3d", "12,12,16", "--shape-2d", "16,16", "--ids", "911,912,913"]
    with pytest.raises(SystemExit, match="nnUNet_raw"):
        args = _parser().parse_args(argv)
        args.func(args)

    monkeypatch.setenv("nnUNet_raw", str(tmp_path))
    args = _parser().parse_args(argv)
    assert args.shape_3d == (12, 12, 16) and args.ids == (911, 912, 913)
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "Dataset913_SynthOrgans" in printed and "wrote" in printed
    assert (tmp_path / "Dataset913_SynthOrgans" / "imagesTs" / "SynthOrgans_001_0000.nii.gz").is_file()

    args = _parser().parse_args([*argv, "--seed", "5", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="--overwrite"):
        args.func(args)
    args = _parser().parse_args([*argv, "--seed", "5", "--out", str(tmp_path), "--overwrite"])
    assert args.func(args) == 0

    with pytest.raises(SystemExit):
        _parser().parse_args(["make-synthetic", "--shape-3d", "12,12"])

    # named organs: recorded in dataset.json's labels and manifest
    args = _parser().parse_args([*argv, "--ids", "921,922,923", "--out", str(tmp_path),
                                 "--organs", "liver_like,vessel_like"])
    assert args.func(args) == 0
    written = json.loads((tmp_path / "Dataset923_SynthOrgans" / "dataset.json").read_text())
    assert written["labels"] == {"background": 0, "liver_like": 1, "vessel_like": 2}
    assert written["synthetic"]["organs"] == ["liver_like", "vessel_like"]
    args = _parser().parse_args([*argv, "--ids", "931,932,933", "--out", str(tmp_path),
                                 "--organs", "lesion_like"])
    with pytest.raises(SystemExit, match="lies inside 'liver_like'"):
        args.func(args)
