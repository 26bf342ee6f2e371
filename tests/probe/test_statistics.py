"""The probe reads the encoder with the target network's InstanceNorm statistics (``--statistics``)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from nnssl_joint.models.downstream import SliceWiseUNet3D
from nnssl_joint.models.encoder import build_encoder_2d
from nnssl_joint.models.norms import VolumeInstanceNorm2d, grouped_statistics
from nnssl_joint.models.preset import load_preset
from nnssl_joint.probe.data import network_norm_slices
from nnssl_joint.probe.features import iter_dense_features, statistics_chunks


@pytest.mark.parametrize("z,group,batch", [(32, 32, 16), (35, 16, 16), (10, 16, 16), (7, 1, 3), (16, 4, 16)])
def test_chunks_yield_every_slice_once_in_groups_of_the_asked_depth(z, group, batch):
    chunks = statistics_chunks(z, group, batch)
    yielded = [s for begin, end, first in chunks for s in range(first, end)]
    assert yielded == list(range(z))
    for begin, end, first in chunks:
        assert begin <= first < end <= z
        if group > 1:
            assert end - begin == min(group, z)  # every group has the patch depth, the last one overlaps
        else:
            assert end - begin <= batch


def _volume(z: int = 8, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    brightness = np.linspace(-2.0, 3.0, z)[None, :, None, None]  # slices of very different intensity
    return (rng.normal(size=(1, z, 32, 32)) + brightness).astype(np.float32)


def test_grouped_features_are_the_target_networks_encoder_over_the_patch():
    """With ``norm_slices`` = the patch depth, the probe's features are what SliceWiseUNet3D's encoder
    (``norm_over_volume``) computes for that patch, and differ from per-slice statistics."""
    torch.manual_seed(0)
    net = SliceWiseUNet3D(1, 3, preset="cpu", norm_over_volume=True).eval()
    image = _volume(z=8)
    x = torch.from_numpy(image).transpose(0, 1)  # (Z, C, Y, X): the batch of slices the network forms
    for norm in net.volume_norms:
        norm.slices = 8
    with torch.no_grad():
        expected = net.encoder(x)[0].permute(0, 2, 3, 1)
    for norm in net.volume_norms:
        norm.slices = 1
    stride = net.preset.encoder.total_stride
    chunks = list(iter_dense_features(net.encoder, image, stride, batch_slices=3, norm_slices=8))
    assert [start for start, _ in chunks] == [0, 3, 6]  # one statistics group, features 3 slices at a time
    grouped = torch.cat([features for _, features in chunks])
    channels = expected.shape[-1]
    torch.testing.assert_close(grouped[..., :channels], expected, atol=1e-5, rtol=1e-5)
    per_slice = torch.cat([f for _, f in iter_dense_features(net.encoder, image, stride, norm_slices=1)])
    assert (per_slice[..., :channels] - expected).abs().max() > 0.1
    assert all(norm.slices == 1 for norm in net.volume_norms)  # left as it was


def test_plain_instance_norms_are_swapped_for_the_block_and_put_back():
    """A pretraining encoder without window statistics has plain InstanceNorm2d modules: inside the block
    they pool over the group, afterwards the encoder has its own modules, parameters and keys again."""
    torch.manual_seed(0)
    encoder = build_encoder_2d(load_preset("cpu"), 1, return_skips=True).eval()
    plain = [m for m in encoder.modules() if type(m) is nn.InstanceNorm2d]
    assert plain, "the cpu preset's encoder uses InstanceNorm2d"
    with torch.no_grad():
        for m in plain:  # non-trivial affine parameters, which the swapped modules must share
            m.weight.uniform_(0.5, 1.5)
            m.bias.uniform_(-0.5, 0.5)
    keys = list(encoder.state_dict())
    ids = [id(m) for m in encoder.modules()]
    image = _volume(z=6, seed=1)
    x = torch.from_numpy(image).transpose(0, 1)
    with torch.no_grad(), grouped_statistics(encoder, 6):
        assert not any(type(m) is nn.InstanceNorm2d for m in encoder.modules())
        assert all(m.slices == 6 for m in encoder.modules() if isinstance(m, VolumeInstanceNorm2d))
        grouped = encoder(x)[0]
    assert [id(m) for m in encoder.modules()] == ids and list(encoder.state_dict()) == keys
    # the same encoder with its norms turned into volume norms (as SliceWiseUNet3D does) gives the same output
    reference = SliceWiseUNet3D(1, 3, preset="cpu", norm_over_volume=True).eval()
    reference.encoder.load_state_dict(encoder.state_dict())
    for norm in reference.volume_norms:
        norm.slices = 6
    with torch.no_grad():
        torch.testing.assert_close(grouped, reference.encoder(x)[0], atol=1e-5, rtol=1e-5)
        assert (encoder(x)[0] - grouped).abs().max() > 0.1  # back to per-slice statistics


def test_the_target_network_decides_the_group():
    three_d = SimpleNamespace(network_arch_init_kwargs={"norm_over_volume": True}, patch_size=[24, 64, 64])
    assert network_norm_slices("3d_fullres", three_d) == 24
    old_plans = SimpleNamespace(network_arch_init_kwargs={}, patch_size=[24, 64, 64])
    assert network_norm_slices("3d_fullres", old_plans) == 1
    assert network_norm_slices("2d", SimpleNamespace(network_arch_init_kwargs={}, patch_size=[64, 64])) == 1
