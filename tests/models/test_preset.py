"""Architecture presets (nnssl_joint/models/preset.py): per-axis strides, presets taken from nnU-Net
plans."""

from __future__ import annotations

import json

import pytest
import torch

from nnssl_joint.models.downstream import JointSSLUNet2D, SliceWiseUNet3D
from nnssl_joint.models.preset import ArchitecturePreset, load_preset, preset_from_nnunet_plans


def _stock_plans(strides, network="dynamic_network_architectures.architectures.unet.PlainConvUNet"):
    n = len(strides)
    return {"plans_name": "nnUNetPlans", "dataset_name": "Dataset001_X",
            "configurations": {"2d": {"architecture": {
        "network_class_name": network,
        "arch_kwargs": {"n_stages": n, "features_per_stage": [min(32 * 2 ** i, 512) for i in range(n)],
                        "conv_op": "torch.nn.modules.conv.Conv2d", "kernel_sizes": [[3, 3]] * n,
                        "strides": strides, "n_conv_per_stage": [2] * n,
                        "n_conv_per_stage_decoder": [2] * (n - 1), "conv_bias": True,
                        "norm_op": "torch.nn.modules.instancenorm.InstanceNorm2d",
                        "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None,
                        "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
                        "nonlin_kwargs": {"inplace": True}},
        "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}}}}


def test_shipped_presets_keep_their_records():
    # checkpoints and plans store to_dict(); the shipped presets' form must not change
    cpu = load_preset("cpu").to_dict()["encoder"]
    assert cpu["strides"] == [1, 2, 2, 2, 2] and cpu["kernel_size"] == 3
    encoder = load_preset("cpu").encoder
    assert encoder.total_strides == (16, 16) and encoder.total_stride == 16


def test_a_preset_from_nnunet_plans_copies_the_2d_topology_with_non_square_strides(tmp_path):
    plans = _stock_plans([[1, 1], [2, 2], [2, 2], [2, 1]])
    preset = preset_from_nnunet_plans(plans, "2d", base="cpu")
    assert preset.name == "nnunet" and list(preset.encoder.features_per_stage) == [32, 64, 128, 256]
    assert preset.encoder.stage_strides == [(1, 1), (2, 2), (2, 2), (2, 1)]
    assert preset.encoder.total_strides == (8, 4) and preset.encoder.total_stride == 8
    assert ArchitecturePreset.from_dict(json.loads(json.dumps(preset.to_dict()))) == preset
    assert preset.embedding_dim == load_preset("cpu").embedding_dim  # the rest comes from the base preset
    # a plans file is a preset source, too
    path = tmp_path / "nnUNetPlans.json"
    path.write_text(json.dumps(plans))
    assert load_preset(path).encoder == preset.encoder
    # the networks accept in-plane sizes that are multiples of the per-axis total stride
    net2d = JointSSLUNet2D(1, 3, False, preset.to_dict())
    assert net2d(torch.zeros(1, 1, 16, 8)).shape == (1, 3, 16, 8)
    net3d = SliceWiseUNet3D(1, 3, False, preset.to_dict())
    assert net3d(torch.zeros(1, 1, 3, 16, 8)).shape == (1, 3, 3, 16, 8)
    with pytest.raises(ValueError, match=r"not divisible by \(8, 4\)"):
        net2d(torch.zeros(1, 1, 12, 8))


def test_plans_with_other_building_blocks_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="ResidualEncoderUNet.*nnU-Net's default"):
        preset_from_nnunet_plans(_stock_plans([[1, 1], [2, 2]], network="x.ResidualEncoderUNet"))
    plans = _stock_plans([[1, 1], [2, 2]])
    plans["configurations"]["2d"]["architecture"]["arch_kwargs"]["norm_op"] = "torch.nn.BatchNorm2d"
    with pytest.raises(ValueError, match="norm_op"):
        preset_from_nnunet_plans(plans)
    with pytest.raises(ValueError, match="3d_lowres.*does not exist"):
        preset_from_nnunet_plans(plans, "3d_lowres")


def test_from_the_same_seed_the_2d_network_starts_with_stock_nnunets_initial_weights():
    # nnU-Net builds both through get_network_from_plans (construction, then apply(initialize)); with the
    # same seed a 2d run from random initialisation must start exactly where stock nnU-Net starts
    from dynamic_network_architectures.architectures.unet import PlainConvUNet
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    plans = _stock_plans([[1, 1], [2, 2], [2, 2], [2, 1]])
    arch = plans["configurations"]["2d"]["architecture"]
    preset = preset_from_nnunet_plans(plans, "2d", base="cpu")

    def build(class_name, kwargs, requires_import):
        torch.manual_seed(3)
        return get_network_from_plans(class_name, kwargs, requires_import, 1, 3, allow_init=True,
                                      deep_supervision=True)

    stock = build(arch["network_class_name"], arch["arch_kwargs"], arch["_kw_requires_import"])
    ours = build("nnssl_joint.models.downstream.JointSSLUNet2D", {"preset": preset.to_dict()}, [])
    assert isinstance(stock, PlainConvUNet) and isinstance(ours, JointSSLUNet2D)
    stock_sd, ours_sd = stock.state_dict(), ours.state_dict()
    # stock also lists its encoder under decoder.encoder.*; every other key must match, tensor for tensor
    assert set(ours_sd) == {k for k in stock_sd if not k.startswith("decoder.encoder.")}
    unequal = [k for k in ours_sd if not torch.equal(ours_sd[k], stock_sd[k])]
    assert not unequal, unequal
    x = torch.randn(2, 1, 32, 16)
    with torch.no_grad():
        for a, b in zip(stock.eval()(x), ours.eval()(x)):
            assert torch.equal(a, b)
    # the initialisation is nnU-Net's He init, not a no-op: a second seed gives other weights
    torch.manual_seed(4)
    other = get_network_from_plans("nnssl_joint.models.downstream.JointSSLUNet2D",
                                   {"preset": preset.to_dict()}, [], 1, 3, allow_init=True,
                                   deep_supervision=True)
    assert not torch.equal(other.state_dict()["encoder.stages.0.0.convs.0.conv.weight"],
                           ours_sd["encoder.stages.0.0.convs.0.conv.weight"])
