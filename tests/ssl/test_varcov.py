"""The variance-covariance term (VICReg) on e and the volume feature: values, what it trains, wiring."""

from __future__ import annotations

import pytest
import torch

from nnssl_joint.models.slice_transformer import masked_slice_mean
from nnssl_joint.probe.diagnostics import rankme
from nnssl_joint.ssl.objective import TERM_VARCOV, ObjectiveConfig
from nnssl_joint.ssl.varcov import variance_covariance_loss


def test_values_at_the_extremes() -> None:
    # identical rows: every feature's std is 0, the hinge is target - sqrt(eps); no covariance
    collapsed = torch.full((10, 8), 1e3)
    assert variance_covariance_loss(collapsed).item() == pytest.approx(1 - 1e-2, abs=1e-4)
    assert variance_covariance_loss(collapsed, target_std=2.0).item() == pytest.approx(2 - 1e-2, abs=1e-4)
    # whitened rows: std 1, no correlation -> 0
    g = torch.Generator().manual_seed(0)
    white = torch.randn(20000, 8, generator=g)
    assert variance_covariance_loss(white).item() < 0.01
    # two copies of one feature: the covariance part sees it, the variance part does not
    x = torch.randn(20000, 1, generator=g)
    copies = torch.cat([x, x], dim=1)
    assert variance_covariance_loss(copies, covariance_weight=0.0).item() < 0.01
    assert variance_covariance_loss(copies, covariance_weight=1.0).item() == pytest.approx(1.0, abs=0.05)


def test_matches_the_definition() -> None:
    g = torch.Generator().manual_seed(1)
    x = 0.3 * torch.randn(50, 6, generator=g) + 5
    cov = torch.cov(x.T)
    var = torch.diagonal(cov)
    expected = torch.relu(1 - torch.sqrt(var + 1e-4)).mean() + 0.04 * (cov - torch.diag(var)).pow(2).sum() / 6
    torch.testing.assert_close(variance_covariance_loss(x), expected)


def test_training_on_it_restores_the_rank_of_a_collapsed_map() -> None:
    """A linear map that sends 32-dimensional inputs to a 2-dimensional subspace of R^16 (a collapsed
    embedding) regains the full rank when trained on the term alone."""
    torch.manual_seed(0)
    x = torch.randn(256, 32)
    lin = torch.nn.Linear(32, 16)
    with torch.no_grad():
        lin.weight.copy_(0.05 * torch.randn(16, 2) @ torch.randn(2, 32) + 1e-3 * torch.randn(16, 32))
    before_rank, before_loss = rankme(lin(x).detach()), variance_covariance_loss(lin(x)).item()
    optimizer = torch.optim.Adam(lin.parameters(), lr=1e-2)
    for _ in range(200):
        optimizer.zero_grad()
        loss = variance_covariance_loss(lin(x))
        loss.backward()
        optimizer.step()
    assert before_rank < 4
    assert rankme(lin(x).detach()) > 14
    assert loss.item() < 0.01 * before_loss


def test_bad_input_is_named() -> None:
    with pytest.raises(ValueError, match="at least 2 rows"):
        variance_covariance_loss(torch.randn(1, 4))
    with pytest.raises(ValueError, match="batch, features"):
        variance_covariance_loss(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="target_std"):
        variance_covariance_loss(torch.randn(3, 4), target_std=0)


def test_masked_mean_ignores_padding() -> None:
    x = torch.arange(12.0).view(1, 4, 3)
    valid = torch.tensor([[True, True, False, False]])
    torch.testing.assert_close(masked_slice_mean(x, valid), x[:, :2].mean(1))
    torch.testing.assert_close(masked_slice_mean(x, None), x.mean(1))


def test_config_activates_the_term_in_every_stage_only_when_weighted() -> None:
    assert TERM_VARCOV not in ObjectiveConfig().stage_at(0).weights
    joint = ObjectiveConfig(lambda_varcov=0.5)
    assert joint.stage_at(0).weights[TERM_VARCOV] == 0.5
    staged = ObjectiveConfig(schedule="staged", stage_a_epochs=1, stage_b_epochs=1, lambda_varcov=2.0)
    for epoch in (0, 1, 2):
        assert staged.stage_at(epoch).weights[TERM_VARCOV] == 2.0
    assert ObjectiveConfig.from_dict(joint.to_dict()) == joint
    with pytest.raises(ValueError, match="lambda_varcov"):
        ObjectiveConfig(lambda_varcov=-1.0)
    with pytest.raises(ValueError, match="varcov_target_std"):
        ObjectiveConfig(varcov_target_std=0.0)
    # the regulariser alone is not an objective
    with pytest.raises(ValueError, match="all loss weights are 0"):
        ObjectiveConfig(lambda_intra=0, lambda_intra_3d=0, lambda_inter=0, lambda_mask=0, lambda_varcov=1.0)


def _batches(seed: int = 0) -> tuple[dict, dict]:
    g = torch.Generator().manual_seed(seed)
    slices = {"global_views": torch.randn(4, 2, 1, 32, 32, generator=g), "small_views": None}
    valid = torch.ones(2, 6, dtype=torch.bool)
    valid[1, 4:] = False
    volumes = {"views": torch.randn(2, 2, 1, 6, 32, 32, generator=g), "valid": valid}
    return slices, volumes


def test_the_model_computes_the_term_and_it_reaches_encoder_and_transformer() -> None:
    from nnssl_joint.models.preset import load_preset
    from nnssl_joint.pretrain.model import JointSSLModel

    torch.manual_seed(0)
    # the paper's objective (the volume gradient unscaled into the encoder), with the term added
    objective = ObjectiveConfig.paper(num_prototypes_2d=8, num_prototypes_3d=4, queue_length_3d=0,
                                      lambda_varcov=1.0)
    model = JointSSLModel(load_preset("cpu"), 1, objective)
    slices, volumes = _batches()
    out = model(slices, volumes, 0, objective.stage_at(0))
    assert 0 < out[TERM_VARCOV].item() < objective.varcov_target_std + 1
    model.zero_grad()
    out[TERM_VARCOV].backward()  # the term alone reaches the encoder and f_inter
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.encoder.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.slice_transformer.parameters())

    # stage B of the staged schedule freezes f_intra: only the volume-feature part remains
    staged = ObjectiveConfig.paper(schedule="staged", stage_a_epochs=0, stage_b_epochs=1, num_prototypes_2d=8,
                                   num_prototypes_3d=4, queue_length_3d=0, lambda_varcov=1.0)
    model_b = JointSSLModel(load_preset("cpu"), 1, staged)
    stage_b = staged.stage_at(0)
    assert stage_b.freeze_intra
    out_b = model_b(None, volumes, 0, stage_b)
    assert TERM_VARCOV in out_b
    out_b[TERM_VARCOV].backward()
    assert all(p.grad is None for p in model_b.encoder.parameters())
