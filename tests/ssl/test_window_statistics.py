"""objective.norm_over_window: the pretraining encoder's statistics over each volume window's valid slices."""

from __future__ import annotations

import pytest
import torch

from nnssl_joint.models.norms import VolumeInstanceNorm2d
from nnssl_joint.models.preset import load_preset
from nnssl_joint.pretrain.autoconfig import SelfConfiguration
from nnssl_joint.pretrain.checkpoint import model_from_record
from nnssl_joint.pretrain.model import JointSSLModel
from nnssl_joint.probe.features import embed_windows
from nnssl_joint.ssl.objective import TERM_INTER, TERM_INTRA, TERM_INTRA_3D, TERM_MASK, ObjectiveConfig


def _objective(**overrides) -> ObjectiveConfig:
    """The paper's objective otherwise; every test sets norm_over_window itself."""
    return ObjectiveConfig.paper(num_prototypes_2d=8, num_prototypes_3d=4, queue_length_3d=0,
                                 freeze_prototypes_iterations=0, **overrides)


def _model(seed: int = 0, **overrides) -> tuple[JointSSLModel, ObjectiveConfig]:
    torch.manual_seed(seed)
    objective = _objective(**overrides)
    return JointSSLModel(load_preset("cpu"), 1, objective), objective


def _batches(seed: int = 0) -> tuple[dict, dict]:
    g = torch.Generator().manual_seed(seed)
    slices = {"global_views": torch.randn(4, 2, 1, 32, 32, generator=g), "small_views": None}
    valid = torch.ones(2, 6, dtype=torch.bool)
    valid[1, 5:] = False
    contrast = torch.linspace(0.5, 2.0, 6)[None, None, None, :, None, None]  # slices differ in contrast
    views = torch.randn(2, 2, 1, 6, 32, 32, generator=g) * contrast
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[:, 2] = True
    return slices, {"views": views, "valid": valid, "mask": mask, "case": torch.tensor([0, 1])}


def _encoder_norms(module: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in module.modules() if isinstance(m, torch.nn.InstanceNorm2d)]


def test_same_parameters_and_2d_items_only_the_window_pass_changes():
    plain, objective = _model(norm_over_window=False)
    window, _ = _model(norm_over_window=True)
    assert plain.state_dict().keys() == window.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), window.state_dict().values()))
    assert not any(type(m) is VolumeInstanceNorm2d for m in _encoder_norms(plain.encoder))
    norms = _encoder_norms(window.encoder)
    assert norms and all(type(m) is VolumeInstanceNorm2d for m in norms)
    slices, volumes = _batches()
    stage = objective.stage_at(0)
    a = plain(slices, volumes, 0, stage)
    b = window(slices, volumes, 0, stage)
    assert all(m.windows is None for m in norms)  # set for the encoder pass only
    # the 2D items share the encoder pass with the window slices and keep their own statistics
    torch.testing.assert_close(b[TERM_INTRA], a[TERM_INTRA])
    # the window slices do not
    assert not torch.allclose(b[TERM_INTRA_3D], a[TERM_INTRA_3D], atol=1e-4)
    b[TERM_INTRA_3D].backward()
    assert all(torch.isfinite(p.grad).all() for p in window.encoder.parameters() if p.grad is not None)
    assert sum(float(p.grad.abs().sum()) for p in window.encoder.parameters() if p.grad is not None) > 0


def _tokens(emb: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """In place of f_inter: the slice embeddings themselves."""
    return emb, emb[:, 0]


def test_a_slice_reaches_its_neighbours_in_the_read_outs_only_with_window_statistics():
    _, volumes = _batches()
    windows = volumes["views"][:, 0].numpy()  # (W, C, N, H, W')
    changed = windows.copy()
    changed[0, :, 4] = 3.0 * changed[0, :, 4] + 1.0  # slice 4 of window 0
    for overrides, others_move in (({"norm_over_window": False}, False), ({"norm_over_window": True}, True)):
        model, _ = _model(**overrides)
        model.eval()
        with torch.no_grad():
            per_slice_a, _ = embed_windows(model.encoder, model.slice_embedding, _tokens,
                                           windows, [6, 5])
            per_slice_b, _ = embed_windows(model.encoder, model.slice_embedding, _tokens,
                                           changed, [6, 5])
        others = [0, 1, 2, 3, 5]
        moved = not torch.allclose(per_slice_a[0][others], per_slice_b[0][others], atol=1e-5)
        assert moved is others_move
        torch.testing.assert_close(per_slice_a[1], per_slice_b[1])  # another window never moves


def test_the_momentum_key_network_normalises_like_the_online_network():
    model, objective = _model(norm_over_window=True, lambda_volume_contrast=1.0,
                              volume_contrast_momentum=0.99)
    key_norms = _encoder_norms(model.volume_key_network["encoder"])
    assert key_norms and all(type(m) is VolumeInstanceNorm2d for m in key_norms)
    out = model(*_batches(), 0, objective.stage_at(0))
    assert all(torch.isfinite(out[k]) for k in (TERM_INTER, TERM_MASK, TERM_INTRA_3D))
    assert all(m.windows is None for m in key_norms)


def test_the_key_is_typed_and_rebuilds_from_a_checkpoint_record():
    assert ObjectiveConfig.paper().norm_over_window is False and ObjectiveConfig().norm_over_window is True
    for value in (True, False):
        assert ObjectiveConfig.from_dict({"norm_over_window": value}).to_dict()["norm_over_window"] is value
    with pytest.raises((TypeError, ValueError), match="norm_over_window"):
        ObjectiveConfig.from_dict({"norm_over_window": "yes"})
    model, objective = _model(norm_over_window=True)
    record_objective = objective.to_dict()  # as the trainer stores it in the checkpoint
    resolved = SelfConfiguration(view_size=32, small_view_size=32, n_small_views=0, n_slices=6,
                                 batch_size_2d=4, batch_size_3d=2, num_prototypes_2d=8, num_prototypes_3d=4,
                                 freeze_prototypes_iterations=0, queue_start_iteration=1,
                                 memory_budget_gb=3.0, estimated_activation_gb=0.1)
    record = {"preset": load_preset("cpu").to_dict(), "input_channels": 1, "resolved": resolved.to_dict(),
              "config": {"objective": record_objective}}
    rebuilt = model_from_record(record)
    rebuilt.load_state_dict(model.state_dict())  # every key matched
    norms = _encoder_norms(rebuilt.encoder)
    assert norms and all(type(m) is VolumeInstanceNorm2d for m in norms)


def test_window_statistics_learn_the_slice_level_term():
    """A few steps on one batch lower L_intra_3d through the pooled statistics (its gradient is exact)."""
    model, objective = _model(norm_over_window=True)
    _, volumes = _batches(seed=3)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for step in range(12):
        out = model(None, volumes, step, objective.stage_at(0))
        optimizer.zero_grad()
        out[TERM_INTRA_3D].backward()
        optimizer.step()
        losses.append(float(out[TERM_INTRA_3D].detach()))
    assert min(losses[-3:]) < losses[0] - 0.05, losses
