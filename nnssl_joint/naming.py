"""nnU-Net's data locations, read from the environment at call time.

nnU-Net keeps raw data, preprocessed data and results in three folders named by the environment
variables ``nnUNet_raw``, ``nnUNet_preprocessed`` and ``nnUNet_results`` (nnU-Net's
documentation/setting_up_paths.md). The helpers here read them when called, not at import, and fail
with an error that names the unset variable and shows how to set it. Plain ``os`` only: importing
this module never imports nnU-Net or torch.
"""

from __future__ import annotations

import os
from pathlib import Path

from nnssl_joint.errors import NnsslJointError

NNUNET_PATH_VARIABLES = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")

_PURPOSE = {
    "nnUNet_raw": "the folder holding raw datasets (DatasetXXX_Name/imagesTr + dataset.json)",
    "nnUNet_preprocessed": "the folder where plans and preprocessed data are written",
    "nnUNet_results": "the folder where trained models are written",
}


class NnUNetPathError(NnsslJointError):
    """An nnU-Net location variable is unset, empty, or points to something that is not a folder."""


def nnunet_path(variable: str, must_exist: bool = False) -> Path:
    """The folder named by the environment variable ``variable`` (one of :data:`NNUNET_PATH_VARIABLES`).

    Raises :class:`NnUNetPathError` naming the variable when it is unset or empty, or, with
    ``must_exist``, when it does not point to an existing folder.
    """
    if variable not in NNUNET_PATH_VARIABLES:
        raise ValueError(f"unknown nnU-Net path variable {variable!r}; "
                         f"expected one of {NNUNET_PATH_VARIABLES}")
    value = os.environ.get(variable, "")
    if not value.strip():
        raise NnUNetPathError(
            f"The environment variable {variable} is not set. nnU-Net and nnssl_joint need it to locate "
            f"{_PURPOSE[variable]}. Set it before running, e.g. `export {variable}=/data/{variable}` "
            f"(all three of {', '.join(NNUNET_PATH_VARIABLES)} are needed; see nnU-Net's "
            f"documentation/setting_up_paths.md)."
        )
    path = Path(value).expanduser()
    if must_exist and not path.is_dir():
        raise NnUNetPathError(
            f"{variable}={value} is not an existing folder. Create it (`mkdir -p {value}`) or point "
            f"{variable} to {_PURPOSE[variable]}."
        )
    return path


def nnunet_raw(must_exist: bool = True) -> Path:
    """``$nnUNet_raw``; by default it must exist (it is read from)."""
    return nnunet_path("nnUNet_raw", must_exist=must_exist)


def nnunet_preprocessed(must_exist: bool = False) -> Path:
    """``$nnUNet_preprocessed``; created by the steps that write into it."""
    return nnunet_path("nnUNet_preprocessed", must_exist=must_exist)


def nnunet_results(must_exist: bool = False) -> Path:
    """``$nnUNet_results``; created by training."""
    return nnunet_path("nnUNet_results", must_exist=must_exist)


# ----------------------------------------------------------------------------------------------------
# nnU-Net identifiers of the plugin, and the run folders nnU-Net builds from them

#: plans identifier of the plugin's plans, pretraining and downstream (``-p nnsslJointPlans``)
PLANS_NAME = "nnsslJointPlans"
#: plans identifier of nnU-Net's own planner (the stock baseline)
STOCK_PLANS_NAME = "nnUNetPlans"
#: the 2D-type configuration the pretraining plans hold (``nnUNetv2_train ID joint_ssl all ...``)
PRETRAINING_CONFIGURATION = "joint_ssl"
#: downstream configurations the plugin's architectures cover
DOWNSTREAM_CONFIGURATIONS = ("2d", "3d_fullres")
PRETRAIN_TRAINER = "JointSSLPretrainTrainer"
FINETUNE_TRAINER = "JointSSLFinetuneTrainer"
#: stock nnU-Net training with the benchmark's length and seed
#: (the ``nnunet`` arm, ``trainers/nnunet_budget.py``)
STOCK_BUDGET_TRAINER = "nnUNetTrainerBudget"
#: the fold a pretraining run trains on (``nnUNetv2_train ... all``)
PRETRAIN_FOLD = "all"
#: files the pretraining run writes next to ``checkpoint_final.pth``: downstream weights per configuration
PRETRAINED_FILES = {"2d": "pretrained_for_2d.pth", "3d_fullres": "pretrained_for_3d_fullres.pth"}


def dataset_folder_name(dataset_id: int, name: str) -> str:
    """``Dataset{ID:03d}_{name}``, nnU-Net's folder name of a dataset."""
    return f"Dataset{int(dataset_id):03d}_{name}"


def run_folder(results: Path, dataset_name: str, trainer: str, plans: str, configuration: str,
               fold: int | str) -> Path:
    """The folder nnU-Net trains into: ``results/Dataset/Trainer__Plans__configuration/fold_F``."""
    return Path(results) / dataset_name / f"{trainer}__{plans}__{configuration}" / f"fold_{fold}"


def pretrain_run_folder(results: Path, dataset_name: str, plans: str = PLANS_NAME) -> Path:
    """Run folder of ``nnUNetv2_train D joint_ssl all -tr JointSSLPretrainTrainer -p plans``."""
    return run_folder(results, dataset_name, PRETRAIN_TRAINER, plans, PRETRAINING_CONFIGURATION,
                      PRETRAIN_FOLD)
