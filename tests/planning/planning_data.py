"""Tiny raw nnU-Net datasets written with SimpleITK for the planning tests (fixtures in conftest.py).

The planning tests build their own data so that they do not depend on nnssl_joint.datasets.synthetic.
Arrays are (z, y, x), spacings (z, y, x) as in nnU-Net; SimpleITK gets them reversed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk


@dataclass
class NnUNetDirs:
    raw: Path
    preprocessed: Path
    results: Path

    def env(self) -> dict[str, str]:
        return {"nnUNet_raw": str(self.raw), "nnUNet_preprocessed": str(self.preprocessed),
                "nnUNet_results": str(self.results)}


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Zero-mean, unit-std noise smoothed over ~2 voxels: survives in-plane resampling with its variance."""
    from scipy.ndimage import gaussian_filter

    field = gaussian_filter(rng.normal(size=shape), sigma=[0 if s == 1 else 1.5 for s in shape])
    return (field - field.mean()) / field.std()


def body_volume(rng: np.random.Generator, shape: tuple[int, int, int], modality: str = "MR",
                empty_end_slices: int = 0) -> np.ndarray:
    """An elliptic 'body' in every slice of an empty (MR: 0) or air-filled (CT: -1000 HU) field of view.

    ``empty_end_slices`` slices at either end of the slice axis hold no body (nnU-Net crops them).
    """
    _, y, x = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    inside = (y / 0.8) ** 2 + (x / 0.7) ** 2 <= 1.0
    if empty_end_slices:
        inside[:empty_end_slices] = False
        inside[-empty_end_slices:] = False
    texture = _smooth_field(rng, shape)
    if modality == "CT":
        volume = np.full(shape, -1000.0)
        volume[inside] = 40 + 30 * texture[inside]
        bone = inside & ((y / 0.2) ** 2 + (x / 0.2) ** 2 <= 1.0)
        volume[bone] = 700 + 100 * texture[bone]
        return np.round(volume).astype(np.int16)
    volume = np.zeros(shape)
    volume[inside] = (300 + 60 * texture[inside]).clip(1, None)
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


def make_volume_dataset(raw: Path, dataset_id: int, name: str, shapes_spacings: list[tuple],
                        modality: str = "MR",
                        file_ending: str = ".nii.gz", seed: int = 0, empty_end_slices: int = 0) -> Path:
    """Volumes ``case{i}_0000<ending>``; ``shapes_spacings`` = [((z, y, x), (sz, sy, sx)), ...].

    ``empty_end_slices`` applies to the last case only.
    """
    rng = np.random.default_rng(seed)
    folder = raw / f"Dataset{dataset_id:03d}_{name}"
    (folder / "imagesTr").mkdir(parents=True)
    for i, (shape, spacing) in enumerate(shapes_spacings):
        empty = empty_end_slices if i == len(shapes_spacings) - 1 else 0
        volume = body_volume(rng, shape, modality, empty_end_slices=empty)
        write_image(volume, folder / "imagesTr" / f"case{i}_0000{file_ending}", spacing)
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
