"""``objective.intra_3d_slices_per_window``: L_intra_3d over k valid slices per window instead of all."""

from __future__ import annotations

import pytest
import torch

from nnssl_joint.models.masked_prediction import sample_valid_slices
from nnssl_joint.models.preset import load_preset
from nnssl_joint.pretrain.model import JointSSLModel
from nnssl_joint.ssl.objective import TERM_INTRA_3D, ObjectiveConfig


def test_draws_k_valid_slices_per_window_never_padding_and_all_of_a_short_window():
    valid = torch.zeros(3, 6, dtype=torch.bool)
    valid[0] = True
    valid[1, :2] = True  # a short window: 2 valid slices
    seen = torch.zeros(3, 6, dtype=torch.long)
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        rows = sample_valid_slices(valid, 3, generator=g)
        assert rows.sum(1).tolist() == [3, 2, 0]
        assert not (rows & ~valid).any()
        seen += rows.long()
    assert (seen[0] > 0).all()  # every valid slice of the full window gets drawn at some point
    assert seen[0].min() > 60  # about 100 = 200 * 3 / 6 each
    with pytest.raises(ValueError, match="count must be >= 1"):
        sample_valid_slices(valid, 0)


def _batches(view: int = 32) -> tuple[dict, dict]:
    g = torch.Generator().manual_seed(0)
    slices = {"global_views": torch.randn(4, 2, 1, view, view, generator=g), "small_views": None}
    valid = torch.ones(2, 6, dtype=torch.bool)
    valid[1, 4:] = False
    views = torch.randn(2, 1, 1, 6, view, view, generator=g).expand(2, 2, 1, 6, view, view).clone()
    return slices, {"views": views, "valid": valid}  # the two 3D views are equal


@pytest.mark.parametrize("k,rows", [(0, 10), (2, 4), (5, 9)])
def test_intra_3d_gets_k_slices_per_window_at_the_same_positions_in_both_views(k, rows, monkeypatch):
    objective = ObjectiveConfig.paper(num_prototypes_2d=8, num_prototypes_3d=4, queue_length_3d=0,
                                      lambda_inter=0.0, lambda_mask=0.0, intra_3d_slices_per_window=k)
    torch.manual_seed(0)
    model = JointSSLModel(load_preset("cpu"), 1, objective)
    seen = []
    original = model._clustering_term

    def spy(loss, views, iteration, indices, bank, assign=True):
        if bank == "3d_slices":
            seen.append([v.detach().clone() for v in views])
        return original(loss, views, iteration, indices, bank, assign)

    monkeypatch.setattr(model, "_clustering_term", spy)
    out = model(*_batches(), 0, objective.stage_at(0))
    assert TERM_INTRA_3D in out and torch.isfinite(out[TERM_INTRA_3D])
    (zs, zt), = seen
    assert zs.shape[0] == zt.shape[0] == rows  # 0: every valid slice (6 + 4)
    torch.testing.assert_close(zs, zt)  # equal views: the same slices were drawn for both


def test_the_default_reads_every_slice_and_negative_values_are_refused():
    assert ObjectiveConfig().intra_3d_slices_per_window == 0
    with pytest.raises(ValueError, match="intra_3d_slices_per_window must be >= 0"):
        ObjectiveConfig(intra_3d_slices_per_window=-1)
    with pytest.raises((TypeError, ValueError), match="intra_3d_slices_per_window"):
        ObjectiveConfig.from_dict({"intra_3d_slices_per_window": 1.5})
