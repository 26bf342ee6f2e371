"""A tiny mixed 2D/3D dataset, preprocessed by nnU-Net's own `nnUNetv2_plan_and_preprocess -c 2d`.

Cases (all 40 x 40 in-plane unless noted, spacing 1 x 1 mm in-plane, so nnU-Net does not resample):
- `vol_z05`, `vol_z09`, `vol_z20`: volumes of 5, 9 and 20 slices, smooth random texture, a small blob label;
- `ramp_z12`: a 12-slice volume whose slice n is texture + 10 * n, to check that views keep slice order;
- `img_a`, `img_b`, `img_c`: single-slice NIfTI 2D images (img_c is 48 x 36), labels all zero.

nnunetv2.paths reads nnUNet_raw/_preprocessed/_results at import time, so nnU-Net runs in a subprocess
with those variables set; the test process never imports nnU-Net with them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

DATASET_ID = 987
DATASET_NAME = f"Dataset{DATASET_ID}_LoaderTest"
VOLUME_SLICES = {"vol_z05": 5, "vol_z09": 9, "vol_z20": 20, "ramp_z12": 12}
IMAGES_2D = {"img_a": (40, 40), "img_b": (40, 40), "img_c": (48, 36)}


def _smooth_texture(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Random texture with structure at several scales (upsampled coarse noise + fine noise)."""
    from scipy.ndimage import zoom

    coarse = rng.normal(size=tuple(max(2, s // 8) for s in shape))
    smooth = zoom(coarse, [s / c for s, c in zip(shape, coarse.shape)],
                  order=1)[tuple(slice(0, s) for s in shape)]
    return 100.0 + 20.0 * smooth + 2.0 * rng.normal(size=shape)


def _write(array_zyx: np.ndarray, spacing_xyz: tuple[float, float, float], path: Path) -> None:
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(array_zyx)
    image.SetSpacing(spacing_xyz)
    sitk.WriteImage(image, str(path))


def write_raw_dataset(raw: Path, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    root = raw / DATASET_NAME
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for name, z in VOLUME_SLICES.items():
        image = _smooth_texture(rng, (z, 40, 40))
        label = np.zeros((z, 40, 40), dtype=np.uint8)
        if name.startswith("ramp"):
            image += 10.0 * np.arange(z, dtype=float)[:, None, None]
        else:
            label[z // 2, 15:22, 18:25] = 1
        _write(image.astype(np.float32), (1.0, 1.0, 2.0), root / "imagesTr" / f"{name}_0000.nii.gz")
        _write(label, (1.0, 1.0, 2.0), root / "labelsTr" / f"{name}.nii.gz")
    for name, shape in IMAGES_2D.items():
        image = _smooth_texture(rng, (1, *shape))
        _write(image.astype(np.float32), (1.0, 1.0, 1.0), root / "imagesTr" / f"{name}_0000.nii.gz")
        _write(np.zeros((1, *shape), dtype=np.uint8), (1.0, 1.0, 1.0), root / "labelsTr" / f"{name}.nii.gz")
    dataset_json = {
        "channel_names": {"0": "MR"},
        "labels": {"background": 0, "blob": 1},
        "numTraining": len(VOLUME_SLICES) + len(IMAGES_2D),
        "file_ending": ".nii.gz",
    }
    (root / "dataset.json").write_text(json.dumps(dataset_json, indent=2))


@pytest.fixture(scope="session")
def case_slices() -> dict[str, int]:
    """Ground truth: slice count of every case of the tiny dataset (1 for the 2D images)."""
    return {**VOLUME_SLICES, **{name: 1 for name in IMAGES_2D}}


@pytest.fixture(scope="session")
def preprocessed_folder(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Folder of nnU-Net's preprocessed 2d configuration of the tiny dataset (blosc2 files + pkl)."""
    base = tmp_path_factory.mktemp("nnunet")
    env = dict(os.environ)
    for key in ("raw", "preprocessed", "results"):
        (base / key).mkdir()
        env[f"nnUNet_{key}"] = str(base / key)
    write_raw_dataset(base / "raw")
    script = Path(sys.executable).with_name("nnUNetv2_plan_and_preprocess")
    command = [str(script), "-d", str(DATASET_ID), "-c", "2d", "-np", "1", "-npfp", "1"]
    result = subprocess.run(command, check=False, env=env, capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        raise RuntimeError(f"nnUNetv2_plan_and_preprocess failed:\n{result.stdout}\n{result.stderr}")
    folder = base / "preprocessed" / DATASET_NAME / "nnUNetPlans_2d"
    assert folder.is_dir(), f"no 2d configuration was preprocessed: {sorted(os.listdir(folder.parent))}"
    return str(folder)
