"""Label-free read-outs of the 3D path (nnssl_joint/ssl/diagnostics.py): where f_inter makes windows alike."""

from __future__ import annotations

import pytest
import torch

from nnssl_joint.models.preset import load_preset
from nnssl_joint.models.slice_transformer import SliceTransformer
from nnssl_joint.pretrain.model import JointSSLModel
from nnssl_joint.ssl.diagnostics import f_inter_trace, shared_share, volume_diagnostics
from nnssl_joint.ssl.objective import ObjectiveConfig


def test_shared_share_is_one_for_identical_vectors_and_zero_when_they_cancel():
    v = torch.randn(1, 16)
    assert shared_share(v.repeat(5, 1)) == pytest.approx(1.0)
    assert shared_share(torch.cat([v, -v])) == pytest.approx(0.0, abs=1e-7)
    torch.manual_seed(0)
    assert shared_share(torch.randn(400, 64)) < 0.01  # independent centred vectors: about 1 / W
    # a common offset as large as the rest holds half the energy
    assert shared_share(torch.randn(2000, 64) + torch.full((64,), 1.0)) == pytest.approx(0.5, abs=0.02)


def _transformer() -> SliceTransformer:
    torch.manual_seed(0)
    return SliceTransformer(32, depth=2, heads=2, dim_head=8, ffn_dim=64, dropout=0.0, downsample=2,
                            offset_kernel=2)


def test_the_trace_finds_the_layer_whose_feed_forward_block_maps_every_window_to_one_vector():
    tokens = torch.randn(6, 8, 32)  # independent windows: little in common at the input
    healthy = f_inter_trace(_transformer(), tokens)
    assert healthy["finter_shared_input"] < 0.5
    assert healthy["finter_shared_layer0"] < 0.5 and healthy["finter_shared_layer1"] < 0.5
    collapsed = _transformer()
    with torch.no_grad():  # layer 1's FFN ignores its input and outputs one large vector
        collapsed.layers[1].ffn[-1].weight.zero_()
        collapsed.layers[1].ffn[-1].bias.copy_(torch.randn(32) * 100)
    trace = f_inter_trace(collapsed, tokens)
    assert trace["finter_shared_layer0"] == pytest.approx(healthy["finter_shared_layer0"])
    assert trace["finter_shared_layer1"] > 0.99
    assert trace["finter_ffn_gain_layer1"] > 20 * healthy["finter_ffn_gain_layer1"]


def test_the_trace_ignores_padded_slices():
    tokens = torch.randn(4, 8, 32)
    valid = torch.ones(4, 8, dtype=torch.bool)
    valid[:, 6:] = False
    padded = tokens.clone()
    padded[:, 6:] = 1e6  # whatever padding holds
    transformer = _transformer()
    expected = f_inter_trace(transformer, tokens, valid)
    assert f_inter_trace(transformer, padded, valid) == pytest.approx(expected)


def test_volume_diagnostics_report_the_trace_with_the_other_read_outs():
    torch.manual_seed(0)
    model = JointSSLModel(load_preset("cpu"), 1, ObjectiveConfig(num_prototypes_2d=8, num_prototypes_3d=4,
                                                                 queue_length_3d=0))
    windows = torch.randn(3, 1, 4, 32, 32)
    valid = torch.ones(3, 4, dtype=torch.bool)
    out = volume_diagnostics(model, windows, valid, windows + 0.01 * torch.randn_like(windows),
                             windows + 0.01 * torch.randn_like(windows))
    depth = len(model.slice_transformer.layers)
    assert {f"finter_shared_layer{k}" for k in range(depth)} <= set(out)
    assert 0.0 <= out["finter_shared_input"] <= 1.0 and out["finter_ffn_gain_layer0"] > 0
    assert out["n_windows"] == 3 and 0.0 <= out["z_mean_pairwise_cosine"] <= 1.0


def _features(z: torch.Tensor, assigned: torch.Tensor, k: int = 4) -> dict[str, torch.Tensor]:
    return {"z": z, "head": z, "scores_3d": torch.nn.functional.one_hot(assigned, k).float()}


def test_view_draws_pool_retrieval_usage_and_cosine_with_intervals_over_volumes():
    from nnssl_joint.ssl.diagnostics import per_window_hits, view_draw_readouts

    torch.manual_seed(0)
    w = 12
    groups = [i // 2 for i in range(w)]  # two windows per volume, as in the harness
    z = torch.randn(w, 16)
    spread = torch.arange(w) % 4  # every prototype used equally often
    swapped = z[torch.arange(w) ^ 1]  # every window's other view looks like its sibling's
    assert per_window_hits(z, z).tolist() == [1.0] * w and per_window_hits(z, swapped).sum() == 0
    good = view_draw_readouts([(_features(z, spread), _features(z, spread))], z, groups, n_boot=200)
    assert good["z_top1_cross_view"]["value"] == 1.0 and good["z_top1_cross_view"]["ci95"] == [1.0, 1.0]
    assert good["entropy_3d"]["value"] == pytest.approx(1.0)
    assert good["n"] == {"windows": w, "volumes": 6, "draws": 1, "bootstrap": 200}
    # two draws, one right and one wrong: pooled 0.5, per draw [1, 0], an interval around the value
    mixed = view_draw_readouts([(_features(z, spread), _features(z, spread)),
                                (_features(z, spread), _features(swapped, spread))], z, groups, n_boot=200)
    assert mixed["z_top1_cross_view"]["per_draw"] == [1.0, 0.0]
    assert mixed["z_top1_cross_view"]["value"] == 0.5 == mixed["head3d_top1_cross_view"]["value"]
    # one prototype for every window: usage 0; identical windows: cosine 1 (pairs of different windows only)
    one = torch.zeros(w, dtype=torch.long)
    collapsed = view_draw_readouts([(_features(z, one), _features(z, one))], z[:1].repeat(w, 1), groups,
                                   n_boot=50)
    assert collapsed["entropy_3d"]["value"] == 0.0 and collapsed["entropy_3d"]["ci95"] == [0.0, 0.0]
    assert collapsed["z_mean_pairwise_cosine"]["value"] == pytest.approx(1.0)
    # half the volumes retrieved, half not: the interval over volumes is wide and holds the value
    half = z.clone()
    half[6:] = swapped[6:]
    split = view_draw_readouts([(_features(z, spread), _features(half, spread))], z, groups, n_boot=500)
    low, high = split["z_top1_cross_view"]["ci95"]
    assert split["z_top1_cross_view"]["value"] == 0.5 and low < 0.3 and high > 0.7
    with pytest.raises(ValueError, match="groups has 3 entries for 12 windows"):
        view_draw_readouts([(_features(z, spread), _features(z, spread))], z, [0, 1, 2])
