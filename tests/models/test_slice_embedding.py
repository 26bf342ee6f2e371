import pytest
import torch
from dynamic_network_architectures.building_blocks.plain_conv_encoder import PlainConvEncoder
from dynamic_network_architectures.building_blocks.residual_encoders import ResidualEncoder
from torch import nn

from nnssl_joint.models import ProjectionHead, SliceEmbeddingHead, encoder_stage_channels

FEATURES = [8, 16, 32]
COMMON = {
    "input_channels": 1, "n_stages": 3, "features_per_stage": FEATURES, "conv_op": nn.Conv2d, "kernel_sizes": 3,
    "strides": [1, 2, 2], "conv_bias": True, "norm_op": nn.InstanceNorm2d, "norm_op_kwargs": {"affine": True},
    "nonlin": nn.LeakyReLU, "nonlin_kwargs": {"inplace": True}, "return_skips": True,
}


def _encoders():
    torch.manual_seed(0)
    return {
        "plain": PlainConvEncoder(n_conv_per_stage=2, **COMMON),
        "residual": ResidualEncoder(n_blocks_per_stage=[1, 1, 1], **COMMON),
    }


@pytest.mark.parametrize("kind", ["plain", "residual"])
def test_head_on_encoder_skips(kind):
    encoder = _encoders()[kind]
    assert encoder_stage_channels(encoder) == FEATURES
    head = SliceEmbeddingHead(encoder_stage_channels(encoder), dim=20)
    images = torch.randn(3, 1, 32, 32)
    skips = encoder(images)
    embedding = head(skips)
    assert embedding.shape == (3, 20)

    embedding.pow(2).sum().backward()
    assert head.proj.weight.grad.abs().sum() > 0
    for stage in encoder.stages:
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in stage.parameters())


@pytest.mark.parametrize("kind", ["plain", "residual"])
def test_each_stage_is_normalised(kind):
    encoder = _encoders()[kind]
    head = SliceEmbeddingHead(FEATURES, dim=20)
    with torch.no_grad():
        skips = encoder(torch.randn(2, 1, 32, 32))
        reference = head(skips)
        for s in range(len(skips)):
            scaled = [f * (1000.0 if i == s else 1.0) for i, f in enumerate(skips)]
            torch.testing.assert_close(head(scaled), reference, atol=1e-5, rtol=1e-4)
        # a change of direction (not only scale) in one stage must change the embedding
        changed = [skips[0], skips[1] + torch.randn_like(skips[1]), skips[2]]
        assert not torch.allclose(head(changed), reference, atol=1e-4)


def test_head_works_for_3d_feature_maps_and_rejects_mismatch():
    head = SliceEmbeddingHead([4, 6], dim=5)
    assert head([torch.randn(2, 4, 3, 3, 3), torch.randn(2, 6, 2, 2, 2)]).shape == (2, 5)
    with pytest.raises(ValueError):
        head([torch.randn(2, 4, 3, 3)])
    with pytest.raises(ValueError):
        head([torch.randn(2, 5, 3, 3), torch.randn(2, 6, 2, 2)])
    with pytest.raises(ValueError):
        encoder_stage_channels(nn.Linear(2, 2))


@pytest.mark.parametrize("norm", ["batch", "layer"])
def test_projection_head(norm):
    head = ProjectionHead(20, 32, 8, norm=norm)
    x = torch.randn(6, 20, requires_grad=True)
    out = head(x)
    assert out.shape == (6, 8)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(6))
    out[:, 0].sum().backward()
    assert x.grad.abs().sum() > 0
    assert head(torch.randn(2, 5, 20)).shape == (2, 5, 8)


def test_global_batchnorm_equals_batchnorm_in_one_process():
    from nnssl_joint.models.slice_embedding import GlobalBatchNorm1d

    torch.manual_seed(0)
    x = torch.randn(10, 6) * 3 + 1
    ref, ours = torch.nn.BatchNorm1d(6), GlobalBatchNorm1d(6)
    assert torch.allclose(ref(x), ours(x), atol=1e-6)
    assert torch.allclose(ref.running_mean, ours.running_mean) and torch.allclose(ref.running_var, ours.running_var)
