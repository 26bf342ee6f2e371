"""Tiny raw nnU-Net datasets written with SimpleITK, and nnU-Net location variables pointing to tmp dirs.

The planning tests build their own data so that they do not depend on nnssl_joint.data.synthetic.
Arrays are (z, y, x), spacings (z, y, x) as in nnU-Net; SimpleITK gets them reversed.
nnunetv2.paths (2.8) reads the environment at call time, so in-process tests only need monkeypatch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk


@dataclass
class NnUNetDirs:
    raw: Path
    preprocessed: Path
    results: Path

    def env(self) -> dict[str, str]:
        return {"nnUNet_raw": str(self.raw), "nnUNet_preprocessed": str(self.preprocessed),
                "nnUNet_results": str(self.results)}


@pytest.fixture
def nnunet_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> NnUNetDirs:
    dirs = NnUNetDirs(tmp_path / "raw", tmp_path / "preprocessed", tmp_path / "results")
    for path in (dirs.raw, dirs.preprocessed, dirs.results):
        path.mkdir()
    for key, value in dirs.env().items():
        monkeypatch.setenv(key, value)
    return dirs


def body_volume(rng: np.random.Generator, shape: tuple[int, int, int], modality: str = "MR") -> np.ndarray:
    """An ellipsoidal 'body' in an empty (MR: 0) or air-filled (CT: -1000 HU) field of view."""
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    inside = (y / 0.8) ** 2 + (x / 0.7) ** 2 <= 1.0
    if shape[0] > 1:
        inside &= np.abs(z) <= 0.95
    if modality == "CT":
        volume = np.full(shape, -1000.0)
        volume[inside] = rng.normal(40, 30, size=int(inside.sum()))
        bone = inside & ((y / 0.2) ** 2 + (x / 0.2) ** 2 <= 1.0)
        volume[bone] = rng.normal(700, 100, size=int(bone.sum()))
        return np.round(volume).astype(np.int16)
    volume = np.zeros(shape)
    volume[inside] = rng.normal(300, 60, size=int(inside.sum())).clip(1, None)
    return volume.astype(np.float32)


def write_image(array_zyx: np.ndarray, path: Path, spacing_zyx=(1.0, 1.0, 1.0), is_rgb: bool = False) -> None:
    image = sitk.GetImageFromArray(array_zyx, isVector=is_rgb)
    if not is_rgb and array_zyx.ndim == 3:
        image.SetSpacing([float(s) for s in spacing_zyx[::-1]])
    sitk.WriteImage(image, str(path), True)


def write_dataset_json(folder: Path, channel_names: dict, file_ending: str, num_training: int) -> None:
    content = {"channel_names": channel_names, "labels": {"background": 0}, "numTraining": num_training,
               "file_ending": file_ending}
    (folder / "dataset.json").write_text(json.dumps(content, indent=2))


def make_volume_dataset(raw: Path, dataset_id: int, name: str, shapes_spacings: list[tuple], modality: str = "MR",
                        file_ending: str = ".nii.gz", seed: int = 0) -> Path:
    """Volumes ``case{i}_0000<ending>``; ``shapes_spacings`` = [((z, y, x), (sz, sy, sx)), ...]."""
    rng = np.random.default_rng(seed)
    folder = raw / f"Dataset{dataset_id:03d}_{name}"
    (folder / "imagesTr").mkdir(parents=True)
    for i, (shape, spacing) in enumerate(shapes_spacings):
        write_image(body_volume(rng, shape, modality), folder / "imagesTr" / f"case{i}_0000{file_ending}", spacing)
    write_dataset_json(folder, {"0": modality}, file_ending, len(shapes_spacings))
    return folder


def make_png_dataset(raw: Path, dataset_id: int, name: str, n: int = 3, size: tuple[int, int] = (32, 32),
                     channel_name: str = "Xray", rgb: str | None = None, seed: int = 1) -> Path:
    """2D uint8 PNGs ``img{i}_0000.png``; ``rgb``: None (grey), 'grey' (grey saved as RGB) or 'colour'."""
    rng = np.random.default_rng(seed)
    folder = raw / f"Dataset{dataset_id:03d}_{name}"
    (folder / "imagesTr").mkdir(parents=True)
    for i in range(n):
        grey = body_volume(rng, (1, *size))[0]
        grey = (grey / grey.max() * 250).astype(np.uint8)
        path = folder / "imagesTr" / f"img{i}_0000.png"
        if rgb is None:
            write_image(grey, path)
        else:
            colour = np.stack([grey, grey, grey], axis=-1)
            if rgb == "colour":
                colour[..., 0] = 255 - grey
            write_image(colour, path, is_rgb=True)
    write_dataset_json(folder, {"0": channel_name}, ".png", n)
    return folder


@pytest.fixture
def mr_volumes(nnunet_dirs: NnUNetDirs) -> Path:
    """Dataset501: three MR volumes, one isotropic, two anisotropic (.nii.gz)."""
    return make_volume_dataset(nnunet_dirs.raw, 501, "MRVol", [
        ((16, 24, 24), (1.0, 1.0, 1.0)),
        ((8, 24, 24), (3.0, 0.9, 0.9)),
        ((12, 20, 28), (2.0, 0.8, 0.8)),
    ])


@pytest.fixture
def xray_pngs(nnunet_dirs: NnUNetDirs) -> Path:
    """Dataset502: three grey 32x32 PNGs."""
    return make_png_dataset(nnunet_dirs.raw, 502, "XrayPng")


@pytest.fixture
def ct_mha(nnunet_dirs: NnUNetDirs) -> Path:
    """Dataset503: two CT volumes (.mha)."""
    return make_volume_dataset(nnunet_dirs.raw, 503, "CTMha", [
        ((10, 24, 24), (2.5, 0.7, 0.7)),
        ((14, 24, 24), (1.5, 0.7, 0.7)),
    ], modality="CT", file_ending=".mha", seed=3)
