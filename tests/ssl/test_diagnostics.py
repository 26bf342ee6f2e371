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
