"""Weights for nnU-Net's stock 2D network (nnssl_joint/export.py with a preset from nnU-Net's plans):
stock nnUNetPlans, stock nnUNetTrainer, nnU-Net's own -pretrained_weights loader, encoder tensors equal
to the pretraining checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nnssl_joint.datasets.synthetic import make_synthetic

# runs in a fresh interpreter: nnunetv2.paths reads the nnU-Net folders when it is first imported
_LOAD_INTO_STOCK = r"""
import json, sys, torch
from nnunetv2.run.run_training import get_trainer_from_args, maybe_load_checkpoint

checkpoint, dataset, *weight_files = sys.argv[1:]
pretrained = torch.load(checkpoint, map_location="cpu", weights_only=False)["network_weights"]
result = {}
for weights in weight_files:
    # nnUNetv2_train DATASET 2d 0 -pretrained_weights WEIGHTS (stock trainer, stock plans) up to its
    # training loop
    trainer = get_trainer_from_args(dataset, "2d", 0, "nnUNetTrainer", "nnUNetPlans",
                                    device=torch.device("cpu"))
    trainer.initialize()
    before = {k: v.clone() for k, v in trainer.network.state_dict().items()}
    maybe_load_checkpoint(trainer, False, False, weights)
    state = trainer.network.state_dict()
    encoder = [k for k in state if k.startswith("encoder.")]
    result[weights] = {
        "network": type(trainer.network).__name__,
        "plans": trainer.plans_manager.plans_name,
        "encoder_keys": len(encoder),
        "encoder_equal": all(torch.equal(state[k], pretrained[k]) for k in encoder),
        "decoder_encoder_equal": all(torch.equal(state["decoder." + k], pretrained[k]) for k in encoder),
        "encoder_changed": any(not torch.equal(state[k], before[k])
                               for k in encoder if state[k].is_floating_point()),
    }
print(json.dumps(result))
"""


def _env(root: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("nnUNet_")}
    env.update(nnUNet_raw=str(root / "raw"), nnUNet_preprocessed=str(root / "preprocessed"),
               nnUNet_results=str(root / "results"), nnUNet_def_n_proc="1", OMP_WAIT_POLICY="PASSIVE")
    return env


def _run(cmd: list[str], env: dict[str, str]) -> str:
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


@pytest.mark.slow  # about 30 s alone (nnU-Net planning), more on a loaded machine
def test_weights_pretrained_with_the_nnunet_preset_load_into_stock_nnunet_2d(tmp_path):
    import torch

    from nnssl_joint.export import export_for_presets
    from nnssl_joint.models.preset import preset_from_nnunet_plans
    from nnssl_joint.pretrain.model import JointSSLModel
    from nnssl_joint.ssl.objective import ObjectiveConfig

    # slices of 48 x 40: nnU-Net's planner gives a non-square last stride
    make_synthetic(tmp_path / "raw", seed=1, n_3d=1, n_2d=1, n_labeled_train=2, n_labeled_test=1,
                   ids=(651, 652, 653), n_organs=2, shape_3d=(8, 48, 40))
    env = _env(tmp_path)
    bin_dir = Path(sys.executable).parent
    _run([str(bin_dir / "nnUNetv2_plan_and_preprocess"), "-d", "653", "-c", "2d", "-np", "1", "-npfp", "1"],
         env)
    folder = next((tmp_path / "preprocessed").glob("Dataset653_*"))
    plans_file = folder / "nnUNetPlans.json"
    plans = json.loads(plans_file.read_text())
    preset = preset_from_nnunet_plans(plans, "2d")
    arch = plans["configurations"]["2d"]["architecture"]["arch_kwargs"]
    assert list(preset.encoder.features_per_stage) == arch["features_per_stage"]
    assert [list(s) for s in preset.encoder.stage_strides] == arch["strides"]

    # a pretraining checkpoint of that preset, as JointSSLPretrainTrainer writes it
    torch.manual_seed(0)
    model = JointSSLModel(preset, 1, ObjectiveConfig())
    checkpoint = tmp_path / "checkpoint_final.pth"
    torch.save({"network_weights": model.state_dict(), "trainer_name": "JointSSLPretrainTrainer",
                "nnssl_joint": {"preset": preset.to_dict(), "input_channels": 1}}, checkpoint)
    export_for_presets(checkpoint, tmp_path)  # pretrained_for_2d.pth, as at the end of pretraining
    stock = tmp_path / "for_nnUNetPlans.pth"
    _run([sys.executable, "-m", "nnssl_joint.cli", "export", "--checkpoint", str(checkpoint), "-d", "653",
          "-c", "2d", "--plans", "nnUNetPlans", "-o", str(stock)], env)

    out = _run([sys.executable, "-c", _LOAD_INTO_STOCK, str(checkpoint), "653",
                str(tmp_path / "pretrained_for_2d.pth"), str(stock)], env)
    result = json.loads(out.strip().splitlines()[-1])
    for weights, facts in result.items():
        assert facts["network"] == "PlainConvUNet" and facts["plans"] == "nnUNetPlans", weights
        assert (facts["encoder_keys"] > 0 and facts["encoder_equal"]
                and facts["decoder_encoder_equal"]), (weights, facts)
        assert facts["encoder_changed"], weights  # the loader really replaced the random initialisation

    # --encoder-scale nnunet: the same tensors at the norm of nnU-Net's initial weights, both copies alike
    from nnssl_joint.export import RESCALE_RECORD, scale_encoder_to_nnunet_init

    scaled = tmp_path / "for_nnUNetPlans_scaled.pth"
    _run([sys.executable, "-m", "nnssl_joint.cli", "export", "--checkpoint", str(checkpoint), "-d", "653",
          "-c", "2d", "--plans", "nnUNetPlans", "-o", str(scaled), "--encoder-scale", "nnunet"], env)
    saved = torch.load(scaled, weights_only=False)
    expected, factors = scale_encoder_to_nnunet_init(model.state_dict())
    assert saved["nnssl_joint"][RESCALE_RECORD] == pytest.approx(factors)
    encoder = [k for k in saved["network_weights"] if k.startswith("encoder.")]
    assert encoder and all(torch.equal(saved["network_weights"][k], expected[k]) for k in encoder)
    assert all(torch.equal(saved["network_weights"][f"decoder.{k}"], expected[k]) for k in encoder)


def test_a_checkpoint_of_another_topology_is_refused_for_stock_plans_with_the_fix(tmp_path):
    pytest.importorskip("nnunetv2")
    from dynamic_network_architectures.architectures.unet import PlainConvUNet
    from torch import nn

    from nnssl_joint.errors import NnsslJointError
    from nnssl_joint.export import fill_pretrained
    from nnssl_joint.models.preset import load_preset
    from nnssl_joint.pretrain.model import JointSSLModel
    from nnssl_joint.ssl.objective import ObjectiveConfig

    stock = PlainConvUNet(1, 4, [32, 64, 128, 256], nn.Conv2d, 3, [1, 2, 2, 2], 2, 2, [2, 2, 2],
                          conv_bias=True, norm_op=nn.InstanceNorm2d,
                          norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=nn.LeakyReLU,
                          nonlin_kwargs={"inplace": True})
    cpu = JointSSLModel(load_preset("cpu"), 1, ObjectiveConfig())
    with pytest.raises(NnsslJointError, match="Shape mismatches"):
        fill_pretrained(stock, cpu.state_dict())
