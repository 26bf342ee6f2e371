"""The volume-context read-out (``nnssl_joint probe --volume-context``): f_inter's per-slice output, as the
3d_fullres network's ``slice_context`` reads it, appended to every pixel's dense features."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nnssl_joint.errors import NnsslJointError
from nnssl_joint.models.downstream import SliceWiseUNet3D
from nnssl_joint.probe.data import ProbeCase
from nnssl_joint.probe.features import iter_dense_features, slice_context
from nnssl_joint.probe.readout import ReadoutSettings, dense_probe, fit_context_pca
from nnssl_joint.probe.run import run_probe, statistics_phrase, volume_context_parts
from nnssl_joint.probe.weights import ProbeWeights, ProbeWeightsError


def _volume(z: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    brightness = np.linspace(-2.0, 3.0, z)[None, :, None, None]
    return (rng.normal(size=(1, z, 32, 32)) + brightness).astype(np.float32)


def _network() -> SliceWiseUNet3D:
    torch.manual_seed(0)
    net = SliceWiseUNet3D(1, 3, preset="cpu", norm_over_volume=True).eval()
    with torch.no_grad():  # f_inter's output projection may start at zero; make every part non-trivial
        for p in net.slice_transformer.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net


def _network_context(net: SliceWiseUNet3D, image: np.ndarray) -> torch.Tensor:
    """f_inter's per-slice output (Z, d) as SliceWiseUNet3D.forward computes it for a patch of Z slices."""
    x = torch.from_numpy(image).transpose(0, 1)
    for norm in net.volume_norms:
        norm.slices = x.shape[0]
    with torch.no_grad():
        per_slice, _ = net.slice_transformer(net.slice_embedding(net.encoder(x))[None])
    for norm in net.volume_norms:
        norm.slices = 1
    return per_slice[0]


def _labeled_case(name, seed, z=6, trend=1.0):
    """Two labeled structures plus noise; ``trend``: a brightness ramp of that size along the slices."""
    label = np.zeros((z, 32, 32), dtype=np.int64)
    label[:, 8:20, 8:20] = 1
    label[2:4, 20:28, 4:12] = 2
    rng = np.random.default_rng(seed)
    image = (label + trend * np.linspace(-1.0, 1.0, z)[:, None, None] + 0.1 * rng.normal(size=label.shape))
    return ProbeCase(name, image[None].astype(np.float32), label)


def test_context_is_the_target_networks_f_inter_output_broadcast_over_the_slice():
    net = _network()
    image = _volume(z=8)
    stride = net.preset.encoder.total_stride
    parts = (net.slice_embedding, net.slice_transformer)
    chunks = list(iter_dense_features(net.encoder, image, stride, batch_slices=3, norm_slices=8,
                                      context=parts, context_slices=8))
    assert [start for start, _ in chunks] == [0, 3, 6]
    features = torch.cat([f for _, f in chunks])
    plain = torch.cat([f for _, f in iter_dense_features(net.encoder, image, stride, norm_slices=8)])
    d = net.preset.embedding_dim
    assert features.shape == (*plain.shape[:-1], plain.shape[-1] + d)
    torch.testing.assert_close(features[..., :-d], plain)  # the dense features are unchanged
    expected = _network_context(net, image)
    context = features[..., -d:]
    torch.testing.assert_close(context, expected[:, None, None, :].expand_as(context), atol=1e-5, rtol=1e-5)
    assert (expected[1:] - expected[:-1]).abs().max() > 1e-3  # differs from slice to slice


def test_context_of_a_slice_reads_its_neighbours():
    """f_inter mixes the slices of a group: changing slice 0 changes the context of slice 5 (and its dense
    features stay what per-slice statistics give them), so this is a volume read-out, not a per-slice one."""
    net = _network()
    image = _volume(z=8)
    changed = image.copy()
    changed[:, 0] = np.random.default_rng(5).normal(size=changed.shape[2:])
    parts = (net.slice_embedding, net.slice_transformer)
    stride = net.preset.encoder.total_stride
    d = net.preset.embedding_dim

    def slice5(volume):
        features = torch.cat([f for _, f in iter_dense_features(net.encoder, volume, stride, norm_slices=1,
                                                                 context=parts, context_slices=8)])
        return features[5]

    a, b = slice5(image), slice5(changed)
    torch.testing.assert_close(a[..., :-d], b[..., :-d])  # per-slice statistics: slice 5's own features
    assert (a[..., -d:] - b[..., -d:]).abs().max() > 1e-4


@pytest.mark.parametrize("z,group", [(10, 4), (3, 8)])
def test_groups_of_the_patch_depth_cover_every_slice_once(z, group):
    net = _network()
    starts = [(s, f.shape[0]) for s, f in iter_dense_features(
        net.encoder, _volume(z=z), net.preset.encoder.total_stride, batch_slices=16, norm_slices=1,
        context=(net.slice_embedding, net.slice_transformer), context_slices=group)]
    covered = [s + i for s, m in starts for i in range(m)]
    assert covered == list(range(z))


def test_context_settings_must_agree():
    net = _network()
    stride = net.preset.encoder.total_stride
    with pytest.raises(ValueError, match="both the target network's patch depth"):
        next(iter_dense_features(net.encoder, _volume(z=8), stride, norm_slices=8,
                                 context=(net.slice_embedding, net.slice_transformer), context_slices=4))
    with pytest.raises(ValueError, match="context_slices > 0"):
        next(iter_dense_features(net.encoder, _volume(z=8), stride, context=(net.slice_embedding,
                                                                             net.slice_transformer)))


def test_dense_probe_reads_the_context_channels():
    """The read-out fits on encoder channels + d context channels, and its record says so."""
    net = _network()
    fit = [_labeled_case("a", 1, trend=0.0), _labeled_case("b", 2, trend=0.0)]
    test = [_labeled_case("c", 3, trend=0.0)]
    settings = ReadoutSettings(seed=0, norm_slices=6, volume_context=6, pixels_per_class=200)
    stride = net.preset.encoder.total_stride
    with_context = dense_probe(net.encoder, fit, test, 3, stride, settings,
                               context=(net.slice_embedding, net.slice_transformer))
    plain = dense_probe(net.encoder, fit, test, 3, stride, ReadoutSettings(seed=settings.seed, norm_slices=6,
                                                                           pixels_per_class=200))
    assert with_context["fit"]["features"] == plain["fit"]["features"] + net.preset.embedding_dim
    assert set(with_context["logistic"]) == {"c"}


def test_weights_without_a_slice_transformer_and_a_2d_target_are_refused():
    net = _network()
    settings = ReadoutSettings(volume_context=8)
    two_d = ProbeWeights(name="w", kind="2d", source="/runs/pretrained_for_2d.pth", preset=net.preset,
                         input_channels=1, encoder=net.encoder)
    with pytest.raises(ProbeWeightsError, match="pretrained_for_2d.pth holds no slice embedding"):
        volume_context_parts(two_d, settings)
    assert volume_context_parts(two_d, ReadoutSettings()) is None  # the plain read-out needs no f_inter
    full = ProbeWeights(name="w", kind="run", source="run", preset=net.preset, input_channels=1,
                        encoder=net.encoder, slice_embedding=net.slice_embedding,
                        slice_transformer=net.slice_transformer)
    assert volume_context_parts(full, settings) == (net.slice_embedding, net.slice_transformer)
    with pytest.raises(NnsslJointError, match="-c 2d has no slice Transformer: use -c 3d_fullres"):
        run_probe(["random"], 613, configuration="2d", volume_context=True)
    assert "f_inter's per-slice output (over groups of 8" in statistics_phrase({"norm_slices": 8,
                                                                               "volume_context": 8})
    assert "f_inter" not in statistics_phrase({"norm_slices": 8})


def test_principal_components_of_the_context_are_fitted_on_the_fit_slices_and_appended():
    """--volume-context-dims D: the appended values are the fit slices' f_inter output centred and projected
    onto its first D principal axes (orthonormal, variance in decreasing order, uncorrelated on the fit
    slices); the test cases use the fit cases' projection."""
    net = _network()
    fit = [_labeled_case("a", 1), _labeled_case("b", 2)]
    parts = (net.slice_embedding, net.slice_transformer)
    stride = net.preset.encoder.total_stride
    settings = ReadoutSettings(norm_slices=6, volume_context=6, volume_context_dims=3)
    mean, components, explained = fit_context_pca(net.encoder, fit, stride, settings, parts)
    d = net.preset.embedding_dim
    assert components.shape == (d, 3) and mean.shape == (d,)
    torch.testing.assert_close(components.T @ components, torch.eye(3, dtype=torch.float64))
    assert 0 < explained.sum() <= 1 and bool((explained[:-1] >= explained[1:]).all())
    rows = torch.cat([slice_context(net.encoder, c.image, stride, parts, 6, norm_slices=6) for c in fit])
    projected = (rows.double() - mean) @ components
    torch.testing.assert_close(projected.mean(0), torch.zeros(3, dtype=torch.float64), atol=1e-6, rtol=0)
    covariance = projected.T @ projected
    off_diagonal = covariance - torch.diag(torch.diag(covariance))
    assert off_diagonal.abs().max() < 1e-6 * covariance.diag().max()
    assert bool((covariance.diag()[:-1] >= covariance.diag()[1:]).all())
    # a test volume gets the same map: its appended values are its own f_inter output projected
    test_image = _labeled_case("c", 3).image
    features = torch.cat([f for _, f in iter_dense_features(
        net.encoder, test_image, stride, norm_slices=6, context=parts, context_slices=6,
        context_map=lambda p: (p.double() - mean) @ components)])
    own = slice_context(net.encoder, test_image, stride, parts, 6, norm_slices=6).double()
    expected = ((own - mean) @ components).float()[:, None, None, :]
    torch.testing.assert_close(features[..., -3:], expected.expand_as(features[..., -3:]),
                               atol=1e-5, rtol=1e-5)


def test_dense_probe_with_context_components_and_its_errors():
    net = _network()
    fit, test = [_labeled_case("a", 1), _labeled_case("b", 2)], [_labeled_case("c", 3)]
    stride = net.preset.encoder.total_stride
    parts = (net.slice_embedding, net.slice_transformer)
    plain = dense_probe(net.encoder, fit, test, 3, stride,
                        ReadoutSettings(norm_slices=6, pixels_per_class=200))
    reduced = dense_probe(net.encoder, fit, test, 3, stride,
                          ReadoutSettings(norm_slices=6, volume_context=6, volume_context_dims=4,
                                          pixels_per_class=200), context=parts)
    assert reduced["fit"]["features"] == plain["fit"]["features"] + 4
    assert reduced["fit"]["context_dims"] == 4 and 0 < reduced["fit"]["context_explained_variance"] <= 1
    assert "context_dims" not in plain["fit"]
    with pytest.raises(ValueError, match="volume_context_dims=13: the fit cases give 12 slices .* most 12"):
        dense_probe(net.encoder, fit, test, 3, stride,
                    ReadoutSettings(norm_slices=6, volume_context=6, volume_context_dims=13), context=parts)
    with pytest.raises(ValueError, match="volume_context_dims needs the volume-context read-out"):
        dense_probe(net.encoder, fit, test, 3, stride, ReadoutSettings(volume_context_dims=4))
    with pytest.raises(NnsslJointError, match="--volume-context-dims 8: .* together with --volume-context"):
        run_probe(["random"], 613, volume_context_dims=8)
    phrase = statistics_phrase({"norm_slices": 8, "volume_context": 8, "volume_context_dims": 8})
    assert "the first 8 principal components (over the fit cases' slices) of f_inter's" in phrase
