"""Planning with nnUNet_n_proc_DA=0: the plugin's planners estimate memory without touching torch's
threads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
from planning_data import NnUNetDirs

from nnssl_joint.planning.downstream import JointSSLDownstreamPlanner
from nnssl_joint.planning.estimate import ThreadIndependentEstimateMixin
from nnssl_joint.planning.prepare import prepare_pretraining_dataset
from nnssl_joint.planning.settings import PRETRAINING_CONFIGURATION
from nnssl_joint.planning.unlabeled import JointSSLPlanner, UnlabeledFingerprintExtractor

UNET = "dynamic_network_architectures.architectures.unet.PlainConvUNet"
KWARGS = {"n_stages": 3, "features_per_stage": [8, 16, 32], "conv_op": "torch.nn.modules.conv.Conv3d",
          "kernel_sizes": [[3, 3, 3]] * 3, "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2]],
          "n_conv_per_stage": [2, 2, 2], "n_conv_per_stage_decoder": [2, 2], "conv_bias": True,
          "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
          "norm_op_kwargs": {"eps": 1e-5, "affine": True},
          "dropout_op": None, "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
          "nonlin_kwargs": {"inplace": True}}
IMPORTS = ("conv_op", "norm_op", "dropout_op", "nonlin")


def test_both_planners_use_the_thread_independent_estimate():
    for planner in (JointSSLPlanner, JointSSLDownstreamPlanner):
        assert planner.static_estimate_VRAM_usage is ThreadIndependentEstimateMixin.static_estimate_VRAM_usage


def test_estimate_equals_nnunets_and_leaves_threads_alone(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("nnUNet_n_proc_DA", "2")
    args = ((32, 32, 32), 1, 3, UNET, KWARGS, IMPORTS)
    expected = ExperimentPlanner.static_estimate_VRAM_usage(*args)
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    with pytest.raises(RuntimeError, match="set_num_threads"):  # nnU-Net's own: the crash this avoids
        ExperimentPlanner.static_estimate_VRAM_usage(*args)
    threads = torch.get_num_threads()
    assert ThreadIndependentEstimateMixin.static_estimate_VRAM_usage(*args) == expected
    assert torch.get_num_threads() == threads


def test_pretraining_plans_with_in_process_augmentation(nnunet_dirs: NnUNetDirs, mr_volumes: Path,
                                                        xray_pngs: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    prepare_pretraining_dataset([501, 502], 900, "Joint")
    UnlabeledFingerprintExtractor("Dataset900_Joint", num_processes=1).run(overwrite_existing=True)
    plans = JointSSLPlanner("Dataset900_Joint").plan_experiment()
    assert list(plans["configurations"]) == [PRETRAINING_CONFIGURATION]
