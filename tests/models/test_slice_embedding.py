import pytest
import torch
from dynamic_network_architectures.building_blocks.plain_conv_encoder import PlainConvEncoder
from dynamic_network_architectures.building_blocks.residual_encoders import ResidualEncoder
from torch import nn

from nnssl_joint.models import ProjectionHead, SliceEmbeddingHead, encoder_stage_channels

FEATURES = [8, 16, 32]
COMMON = {
    "input_channels": 1, "n_stages": 3, "features_per_stage": FEATURES,
    "conv_op": nn.Conv2d, "kernel_sizes": 3,
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


@pytest.mark.parametrize("norm", ["batch", "layer", "running_batch"])
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
    assert (torch.allclose(ref.running_mean, ours.running_mean)
            and torch.allclose(ref.running_var, ours.running_var))


def test_running_batchnorm_centres_tiny_batches_that_share_one_component():
    """Batches of 2 samples that share a large common vector (like the volume features Z): LayerNorm keeps the
    common part and its outputs stay nearly parallel; RunningBatchNorm1d removes it with statistics over
    many batches, so its outputs spread, and a sample's output does not depend on its batch partner
    (plain BatchNorm maps any 2 samples to +-1)."""
    from nnssl_joint.models.slice_embedding import RunningBatchNorm1d

    g = torch.Generator().manual_seed(0)
    common = torch.randn(16, generator=g) * 5
    pool = common + 0.05 * torch.randn(32, 16, generator=g)
    norm = RunningBatchNorm1d(16, momentum=0.05)
    for _ in range(300):
        norm(pool[torch.randint(32, (2,), generator=g)])
    torch.testing.assert_close(norm.running_mean, pool.mean(0), atol=0.03, rtol=0)
    out = norm(pool)
    assert out.mean(0).abs().max() < 0.5 and 0.5 < out.std(0).mean() < 2.0
    z = torch.nn.functional.normalize(out, dim=1)
    assert float((z @ z.T).sum() - 32) / (32 * 31) < 0.2  # spread (LayerNorm'd inputs: about 1.0)
    ln = torch.nn.functional.normalize(torch.nn.functional.layer_norm(pool, (16,)), dim=1)
    assert float((ln @ ln.T).sum() - 32) / (32 * 31) > 0.9
    norm.eval()
    a, b = norm(pool[[0, 1]]), norm(pool[[0, 2]])
    torch.testing.assert_close(a[0], b[0])
    assert {"running_mean", "running_var", "num_batches_tracked"} <= set(norm.state_dict())


def _blob_images(n: int, size: int = 32) -> torch.Tensor:
    """Structurally different slices: one bright disc of varying size and position on a dark background."""
    g = torch.Generator().manual_seed(1)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    images = []
    for _ in range(n):
        cy, cx = torch.randint(6, size - 6, (2,), generator=g)
        r = 2 + 6 * torch.rand(1, generator=g)
        images.append(((yy - cy) ** 2 + (xx - cx) ** 2 < r**2).float() * 3 - 1)
    return torch.stack(images)[:, None]


def _spread(descriptors: torch.Tensor) -> float:
    d = torch.nn.functional.normalize(descriptors, dim=1)
    gram = d @ d.T
    n = len(gram)
    return 1.0 - float((gram.sum() - gram.diagonal().sum()) / (n * (n - 1)))


def test_max_pooling_keeps_what_instance_norm_removes_from_the_average():
    """After InstanceNorm each channel's spatial mean is the affine bias for every input, so average-pooled
    descriptors of an nnU-Net encoder are nearly the same for all slices (the clustering losses then have
    nothing to separate); the maximum still depends on the image. Measured at initialisation."""
    encoder = _encoders()["plain"].eval()
    with torch.no_grad():
        skips = encoder(_blob_images(16))
    for features in skips[1:]:
        flat = features.flatten(2)
        assert _spread(flat.amax(-1)) > 3 * _spread(flat.mean(-1))


def test_pooling_choices():
    skips = [torch.randn(2, 4, 5, 5), torch.randn(2, 6, 3, 3)]
    assert SliceEmbeddingHead([4, 6], 5, "avgmax").proj.in_features == 20
    assert SliceEmbeddingHead([4, 6], 5, "avg").proj.in_features == 10
    head = SliceEmbeddingHead([4, 6], 5, "max")
    with torch.no_grad():
        moved = [s.clone() for s in skips]
        flat = moved[0].view(2, 4, -1)
        flat.scatter_(2, flat.argmin(2, keepdim=True), -100.0)  # lowers each channel's mean, not its maximum
        torch.testing.assert_close(head(moved), head(skips))
    with pytest.raises(ValueError, match="slice pooling"):
        SliceEmbeddingHead([4], 5, "median")
