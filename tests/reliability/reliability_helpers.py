"""Helpers of the reliability tests: tiny raw datasets, nnU-Net locations, pretraining runs through
``nnUNetv2_train`` (subprocess, like a user) or through nnU-Net's own ``run_training`` in this process
(for the many small data-surprise runs, where a subprocess would cost more time to import than to train).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
TRAINER = "JointSSLPretrainTrainer"
PLANS = "nnsslJointPlans"
RUN_SUBDIR = f"{TRAINER}__{PLANS}__joint_ssl/fold_all"
#: the shared dataset and reference run of conftest.py: 4 epochs x 5 iterations, a checkpoint every epoch
BASE_ID = 900
#: the defaults on a tiny budget. The contrastive volume term's queue is 4 entries (one step's: 2 windows x 2
#: views) instead of 128: a queue that fills over the whole run raises that term from epoch to epoch (1.9 to
#: 3.7 with 128) while every other term falls, so no epoch after the first would improve the total loss and
#: checkpoint_best would never be newer than checkpoint_latest, a case the kill tests must reach
REFERENCE_CONFIG = {"optim": {"num_epochs": 4, "iterations_per_epoch": 5, "save_every": 1},
                    "data": {"batch_size_2d": 8, "batch_size_3d": 2, "n_slices": 4, "n_small_views": 0},
                    "objective": {"volume_contrast_queue": 4}}


@dataclass
class Workspace:
    raw: Path
    pre: Path
    res: Path

    @classmethod
    def create(cls, root: Path, raw: Path | None = None, pre: Path | None = None) -> Workspace:
        ws = cls(raw or root / "raw", pre or root / "pre", root / "res")
        for path in (ws.raw, ws.pre, ws.res):
            path.mkdir(parents=True, exist_ok=True)
        return ws

    def env(self, **extra: str) -> dict[str, str]:
        """Environment of a user's shell for nnU-Net commands (planning: no nnUNet_n_proc_DA=0)."""
        env = dict(os.environ)
        env.pop("nnUNet_n_proc_DA", None)
        env.pop("NNSSL_JOINT_CONFIG", None)
        env.update(nnUNet_raw=str(self.raw), nnUNet_preprocessed=str(self.pre), nnUNet_results=str(self.res),
                   nnUNet_extTrainer=str(REPO / "trainers"), nnUNet_def_n_proc="1", PYTHONUNBUFFERED="1")
        env.update(extra)
        return env

    def run_dir(self, dataset: str) -> Path:
        return self.res / dataset / RUN_SUBDIR


@contextlib.contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables for in-process nnU-Net calls (nnunetv2.paths reads them at call time)."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def nnunet_env(ws: Workspace, **extra: str) -> contextlib.AbstractContextManager:
    keys = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnUNet_extTrainer", "nnUNet_def_n_proc")
    values = {k: v for k, v in ws.env(**extra).items() if k in keys or k in extra}
    return environment(values)


# --------------------------------------------------------------------------------------------- raw data
def body(rng: np.random.Generator, shape: tuple[int, int, int], scale: float = 300.0) -> np.ndarray:
    """Smooth random texture inside an ellipse of every slice, 0 outside (like an MR body)."""
    from scipy.ndimage import gaussian_filter

    _, y, x = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    inside = (y / 0.85) ** 2 + (x / 0.75) ** 2 <= 1.0
    texture = gaussian_filter(rng.normal(size=shape), sigma=[0 if s == 1 else 1.2 for s in shape])
    texture = (texture - texture.mean()) / texture.std()
    return np.where(inside, (scale + 0.2 * scale * texture).clip(1, None), 0).astype(np.float32)


def write_image(array_zyx: np.ndarray, path: Path, spacing_zyx=(1.0, 1.0, 1.0),
                is_vector: bool = False) -> None:
    image = sitk.GetImageFromArray(array_zyx, isVector=is_vector)
    if not is_vector and array_zyx.ndim == 3:
        image.SetSpacing([float(s) for s in spacing_zyx[::-1]])
    sitk.WriteImage(image, str(path), True)


def write_dataset(raw: Path, dataset_id: int, name: str, cases: dict[str, list[np.ndarray]],
                  spacings: dict[str, tuple] | None = None, channel_names: dict | None = None,
                  file_ending: str = ".nii.gz") -> Path:
    """``cases``: id -> one (z, y, x) array per channel (z = 1 for a 2D image; 2D arrays for PNGs)."""
    folder = raw / f"Dataset{dataset_id:03d}_{name}"
    (folder / "imagesTr").mkdir(parents=True)
    for case, channels in cases.items():
        for c, array in enumerate(channels):
            spacing = (spacings or {}).get(case, (1.0, 1.0, 1.0))
            write_image(array, folder / "imagesTr" / f"{case}_{c:04d}{file_ending}", spacing)
    content = {"channel_names": channel_names or {"0": "MR"}, "labels": {"background": 0},
               "numTraining": len(cases), "file_ending": file_ending}
    (folder / "dataset.json").write_text(json.dumps(content, indent=2))
    return folder


def volumes(rng: np.random.Generator, slice_counts: list[int], size: int = 32) -> dict[str, list[np.ndarray]]:
    return {f"vol{i}": [body(rng, (z, size, size))] for i, z in enumerate(slice_counts)}


def pngs(rng: np.random.Generator, n: int, size: int = 32, dtype=np.uint8) -> dict[str, list[np.ndarray]]:
    top = 250 if dtype == np.uint8 else 60000
    out = {}
    for i in range(n):
        grey = body(rng, (1, size, size))[0]
        out[f"img{i}"] = [(grey / grey.max() * top).astype(dtype)]
    return out


def prepare_and_plan(ws: Workspace, sources: list[int], target: int, name: str) -> str:
    """``nnssl_joint prepare`` + ``plan_and_preprocess`` through their Python API; returns the dataset
    name."""
    from nnssl_joint.planning import plan_and_preprocess_unlabeled, prepare_pretraining_dataset

    with nnunet_env(ws):
        prepare_pretraining_dataset(sources, target, name)
        plan_and_preprocess_unlabeled(target, num_processes=1, num_processes_fingerprint=1)
    return f"Dataset{target:03d}_{name}"


def copy_preprocessed(src: Workspace, dataset: str, root: Path,
                      change: Callable[[str, np.ndarray], np.ndarray | None] | None = None) -> Workspace:
    """A new workspace (own preprocessed and results roots) holding a copy of ``dataset``'s preprocessed
    data; ``change(case, data)`` may return new (C, Z, Y, X) data for a case (real data corruption)."""
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2

    ws = Workspace.create(root, raw=src.raw)
    shutil.copytree(src.pre / dataset, ws.pre / dataset)
    if change is not None:
        folder = ws.pre / dataset / f"{PLANS}_joint_ssl"
        ds = nnUNetDatasetBlosc2(str(folder))
        for case in ds.identifiers:
            data, seg, _, properties = ds.load_case(case)
            new = change(case, np.asarray(data[:]))
            if new is not None:
                seg = np.asarray(seg[:])
                for suffix in (".b2nd", "_seg.b2nd"):
                    (folder / f"{case}{suffix}").unlink()
                nnUNetDatasetBlosc2.save_case(new.astype(np.float32), seg, properties, str(folder / case))
    return ws


# ------------------------------------------------------------------------------------------- pretraining
def write_config(path: Path, config: dict) -> Path:
    path.write_text(json.dumps(config))
    return path


def train_command(dataset_id: int, resume: bool = False) -> list[str]:
    cmd = [str(BIN / "nnUNetv2_train"), str(dataset_id), "joint_ssl", "all", "-tr", TRAINER, "-p", PLANS,
           "-device", "cpu"]
    return cmd + (["--c"] if resume else [])


def train_cli(ws: Workspace, dataset_id: int, config: Path, resume: bool = False, expect_ok: bool = True,
              timeout: int = 300) -> subprocess.CompletedProcess:
    env = ws.env(NNSSL_JOINT_CONFIG=str(config), nnUNet_n_proc_DA="0")
    res = subprocess.run(train_command(dataset_id, resume), env=env, cwd=ws.res, capture_output=True,
                         text=True, timeout=timeout, check=False)
    if expect_ok and res.returncode != 0:
        raise AssertionError("nnUNetv2_train failed "
                             f"({res.returncode}):\n{res.stdout[-4000:]}\n{res.stderr[-4000:]}")
    return res


def train_in_process(ws: Workspace, dataset_id: int, config: Path) -> str:
    """nnU-Net's ``run_training`` (what ``nnUNetv2_train`` calls) in this process; returns the run's log."""
    from nnunetv2.run.run_training import run_training

    from nnssl_joint.common.seeding import capture_rng, restore_rng

    rng = capture_rng()
    try:
        with nnunet_env(ws, NNSSL_JOINT_CONFIG=str(config), nnUNet_n_proc_DA="0"):
            run_training(str(dataset_id), "joint_ssl", "all", TRAINER, PLANS, device=torch.device("cpu"))
    finally:
        restore_rng(rng)
    logs = sorted((ws.res).glob(f"*/{RUN_SUBDIR}/training_log_*.txt"))
    return logs[-1].read_text()


def read_losses(run_dir: Path) -> list[dict]:
    from nnssl_joint.pretrain.run_logging import IterationLossFile

    return IterationLossFile.read(run_dir / "losses.tsv")


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def assert_same_tensors(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), f"{what}: keys differ"
    for k, v in a.items():
        assert torch.equal(v, b[k]), f"{what}: {k} differs"
