"""The probe inside pretraining (nnssl_joint/probe/during_training.py): it leaves the network's mode,
its state and every random stream as they were, and a seeded run's losses are the same with it on."""

from __future__ import annotations

import json
import math
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from nnssl_joint.models.preset import load_preset
from nnssl_joint.pretrain.autoconfig import SelfConfiguration
from nnssl_joint.pretrain.config import PretrainConfig
from nnssl_joint.pretrain.model import JointSSLModel
from nnssl_joint.probe.data import ProbeCase
from nnssl_joint.probe.during_training import PROBE_LOG_KEYS, probe_model
from nnssl_joint.ssl.objective import ObjectiveConfig


class _Target:
    """A loaded target as the probe sees it: two tiny labeled volumes to fit on, one to test."""

    def __init__(self) -> None:
        rng = np.random.default_rng(0)
        cases = []
        for i in range(3):
            label = np.zeros((6, 32, 32), dtype=np.int64)
            label[:, 8:20, 10:24] = 1
            image = (label + 0.3 * rng.standard_normal(label.shape))[None].astype(np.float32)
            cases.append(ProbeCase(f"c{i}", image, label))
        self.fit, self.test, self.num_classes = cases[:2], cases[2:], 2
        self.norm_slices = 6  # a 3d_fullres target planned with norm_over_volume: statistics over the patch


def _model() -> JointSSLModel:
    torch.manual_seed(0)
    resolved = SelfConfiguration(view_size=32, small_view_size=32, n_small_views=0, n_slices=4,
                                 batch_size_2d=4, batch_size_3d=2, num_prototypes_2d=8, num_prototypes_3d=4,
                                 freeze_prototypes_iterations=1, queue_start_iteration=1,
                                 memory_budget_gb=3.0, estimated_activation_gb=0.1)
    return JointSSLModel(load_preset("cpu"), 1, resolved.objective(ObjectiveConfig()))


def _draw() -> tuple:
    return torch.rand(3).tolist(), np.random.rand(3).tolist(), random.random()


def test_probe_keeps_mode_state_and_random_streams():
    model = _model()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(5), np.random.seed(5), random.seed(5)
    expected = _draw()
    torch.manual_seed(5), np.random.seed(5), random.seed(5)
    result = probe_model(model, _Target(), {"n_slices": 4, "view_size": 32})
    assert _draw() == expected
    assert model.training and all(m.training for m in model.modules())
    for key, value in model.state_dict().items():  # BatchNorm running statistics included
        assert torch.equal(value, before[key]), key
    assert result["dice"]["logistic"]["mean"] > 0.5  # an intensity-separable organ
    for group, name in PROBE_LOG_KEYS.values():
        assert name in result[group], name


def test_probe_section_of_the_configuration():
    assert PretrainConfig().probe.target is None  # off by default
    cfg = PretrainConfig.from_dict({"probe": {"target": 503, "every_epochs": 2}})
    assert (cfg.probe.target, cfg.probe.every_epochs, cfg.probe.configuration) == (503, 2, "3d_fullres")
    assert cfg.to_dict()["probe"] == {"target": 503, "every_epochs": 2, "configuration": "3d_fullres",
                                      "fit_cases": None}
    with pytest.raises(ValueError, match="probe.every_epochs must be >= 1"):
        PretrainConfig.from_dict({"probe": {"every_epochs": 0}})


@pytest.mark.slow
def test_seeded_pretraining_has_the_same_losses_with_the_probe_on(tmp_path):
    """Two nnUNetv2_train runs of the reliability reference configuration, the second with the probe on a
    labeled target every epoch: identical losses.tsv and final weights, probe values in log and plot."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "reliability"))
    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprint_dataset
    from reliability_helpers import (
        REFERENCE_CONFIG,
        Workspace,
        assert_same_tensors,
        load,
        nnunet_env,
        pngs,
        prepare_and_plan,
        read_losses,
        train_cli,
        volumes,
        write_config,
        write_dataset,
    )

    from nnssl_joint.datasets.synthetic import write_labeled_3d
    from nnssl_joint.planning.downstream import JointSSLDownstreamPlanner

    ws = Workspace.create(tmp_path / "a")
    rng = np.random.default_rng(0)
    write_dataset(ws.raw, 501, "Vols", volumes(rng, [10, 8, 12]),
                  spacings={f"vol{i}": (2.0, 1.0, 1.0) for i in range(3)})
    write_dataset(ws.raw, 502, "Pngs", pngs(rng, 4), channel_names={"0": "Xray"}, file_ending=".png")
    name = prepare_and_plan(ws, [501, 502], 900, "Base")
    write_labeled_3d(ws.raw, 503, "SynthOrgans", n_train=2, n_test=1, shape=(8, 32, 32), seed=0)
    with nnunet_env(ws):
        extract_fingerprint_dataset(503, num_processes=1, check_dataset_integrity=False, clean=True,
                                    verbose=False)
        JointSSLDownstreamPlanner(503).plan_experiment()
    config = {**REFERENCE_CONFIG, "optim": {**REFERENCE_CONFIG["optim"], "num_epochs": 2}}
    train_cli(ws, 900, write_config(tmp_path / "plain.json", config))
    reference = read_losses(ws.run_dir(name))
    final = load(ws.run_dir(name) / "checkpoint_final.pth")["network_weights"]

    probed_ws = Workspace.create(tmp_path / "b", raw=ws.raw, pre=ws.pre)
    res = train_cli(probed_ws, 900, write_config(tmp_path / "probe.json",
                                                 {**config, "probe": {"target": 503, "every_epochs": 1}}))
    run = probed_ws.run_dir(name)
    assert read_losses(run) == reference
    assert_same_tensors(load(run / "checkpoint_final.pth")["network_weights"], final, "final weights")
    log = "".join(p.read_text() for p in run.glob("training_log_*.txt"))
    assert "probe: Dataset503_SynthOrgans (3d_fullres) every 1 epoch(s)" in log, res.stdout[-3000:]
    assert log.count("probe (epoch ") == 2
    logged = load(run / "checkpoint_final.pth")["logging"]
    assert len(logged["probe_dice"]) == 2 and all(math.isfinite(v) for v in logged["probe_dice"])
    assert json.loads((run / "nnssl_joint_config.json").read_text())["config"]["probe"]["target"] == 503
