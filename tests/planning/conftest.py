"""Fixtures of the planning tests: nnU-Net location variables pointing to tmp dirs, tiny raw datasets.

nnunetv2.paths (2.8) reads the environment at call time, so in-process tests only need monkeypatch.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from planning_data import NnUNetDirs, make_png_dataset, make_volume_dataset


@pytest.fixture
def nnunet_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> NnUNetDirs:
    dirs = NnUNetDirs(tmp_path / "raw", tmp_path / "preprocessed", tmp_path / "results")
    for path in (dirs.raw, dirs.preprocessed, dirs.results):
        path.mkdir()
    for key, value in dirs.env().items():
        monkeypatch.setenv(key, value)
    return dirs


@pytest.fixture
def mr_volumes(nnunet_dirs: NnUNetDirs) -> Path:
    """Dataset501: three MR volumes, one isotropic, two anisotropic (.nii.gz); the last has 2 empty slices per
    end."""
    return make_volume_dataset(nnunet_dirs.raw, 501, "MRVol", [
        ((16, 24, 24), (1.0, 1.0, 1.0)),
        ((8, 24, 24), (3.0, 0.9, 0.9)),
        ((12, 20, 28), (2.0, 0.8, 0.8)),
    ], empty_end_slices=2)


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
