"""objective.volume_terms_train_encoder and inter_trains_transformer: which parameters L_inter and L_mask
reach. Each test isolates one routing key against the paper's objective (ObjectiveConfig.paper: L_inter and
L_mask trained through f_inter into the encoder with their whole gradient)."""

from __future__ import annotations

import pytest
import torch

from nnssl_joint.models.preset import load_preset
from nnssl_joint.pretrain.model import JointSSLModel
from nnssl_joint.ssl.objective import TERM_INTER, TERM_INTRA_3D, TERM_MASK, ObjectiveConfig


def _volumes(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    valid = torch.ones(2, 6, dtype=torch.bool)
    valid[1, 5:] = False
    return {"views": torch.randn(2, 2, 1, 6, 32, 32, generator=g), "valid": valid}


def _grad_norm(module: torch.nn.Module) -> float:
    return sum(float(p.grad.abs().sum()) for p in module.parameters() if p.grad is not None)


@pytest.mark.parametrize("train_encoder", [True, False])
def test_volume_terms_reach_the_encoder_only_when_asked(train_encoder: bool) -> None:
    torch.manual_seed(0)
    objective = ObjectiveConfig.paper(num_prototypes_2d=8, num_prototypes_3d=4, queue_length_3d=0,
                                      volume_terms_train_encoder=train_encoder)
    model = JointSSLModel(load_preset("cpu"), 1, objective)
    out = model(None, _volumes(), 0, objective.stage_at(0))
    (out[TERM_INTER] + out[TERM_MASK]).backward(retain_graph=True)
    # f_inter, the 3D head and the mask decoder learn either way
    assert _grad_norm(model.slice_transformer) > 0
    assert _grad_norm(model.projection_3d) > 0
    assert _grad_norm(model.masked_modeling) > 0
    if train_encoder:
        assert _grad_norm(model.encoder) > 0 and _grad_norm(model.slice_embedding) > 0
    else:
        assert _grad_norm(model.encoder) == 0 and _grad_norm(model.slice_embedding) == 0
    # the slice-level term between the 3D views trains the encoder in both settings
    model.zero_grad()
    out[TERM_INTRA_3D].backward()
    assert _grad_norm(model.encoder) > 0


def test_the_key_is_typed_and_recorded() -> None:
    assert ObjectiveConfig().volume_terms_train_encoder is True
    assert ObjectiveConfig.paper().volume_terms_train_encoder is True
    # false needs the whole gradient scale (the paper's): the default's 0.1 would have no effect
    off = ObjectiveConfig.from_dict({"volume_terms_train_encoder": False,
                                     "volume_encoder_gradient_scale": 1.0})
    assert off.to_dict()["volume_terms_train_encoder"] is False
    with pytest.raises((TypeError, ValueError), match="volume_terms_train_encoder"):
        ObjectiveConfig.from_dict({"volume_terms_train_encoder": "no"})


@pytest.mark.parametrize("inter_trains_transformer", [True, False])
def test_inter_reaches_f_inter_only_when_asked(inter_trains_transformer: bool) -> None:
    torch.manual_seed(0)
    objective = ObjectiveConfig.paper(num_prototypes_2d=8, num_prototypes_3d=4, queue_length_3d=0,
                                      freeze_prototypes_iterations=0,
                                      inter_trains_transformer=inter_trains_transformer)
    model = JointSSLModel(load_preset("cpu"), 1, objective)
    out = model(None, _volumes(), 0, objective.stage_at(0))
    out[TERM_INTER].backward(retain_graph=True)
    # the 3D head and the 3D prototypes learn from L_inter either way
    assert _grad_norm(model.projection_3d) > 0
    assert _grad_norm(model.inter_loss) > 0
    upstream = (model.slice_transformer, model.slice_embedding, model.encoder)
    if inter_trains_transformer:
        assert all(_grad_norm(module) > 0 for module in upstream)
    else:
        assert all(_grad_norm(module) == 0 for module in upstream)
    # L_mask still trains f_inter (and, with volume_terms_train_encoder, the encoder) with L_inter's path cut
    model.zero_grad()
    out[TERM_MASK].backward()
    assert _grad_norm(model.slice_transformer) > 0 and _grad_norm(model.encoder) > 0


def test_inter_routing_key_is_typed_and_recorded() -> None:
    assert ObjectiveConfig.paper().inter_trains_transformer is True
    assert ObjectiveConfig().inter_trains_transformer is False
    for value in (True, False):
        assert ObjectiveConfig.from_dict({"inter_trains_transformer": value}).to_dict()[
            "inter_trains_transformer"] is value
    with pytest.raises((TypeError, ValueError), match="inter_trains_transformer"):
        ObjectiveConfig.from_dict({"inter_trains_transformer": 0})


def test_the_volume_gradient_into_the_encoder_is_scaled_and_nothing_else_changes() -> None:
    grads, losses = {}, {}
    for scale in (1.0, 0.1):
        torch.manual_seed(0)
        objective = ObjectiveConfig.paper(num_prototypes_2d=8, num_prototypes_3d=4, queue_length_3d=0,
                                          freeze_prototypes_iterations=0, volume_encoder_gradient_scale=scale)
        model = JointSSLModel(load_preset("cpu"), 1, objective)
        out = model(None, _volumes(), 0, objective.stage_at(0))
        losses[scale] = (out[TERM_INTER].item(), out[TERM_MASK].item())
        (out[TERM_INTER] + out[TERM_MASK]).backward()
        grads[scale] = {name: torch.cat([p.grad.flatten() for p in module.parameters() if p.grad is not None])
                        for name, module in (("encoder", model.encoder), ("g", model.slice_embedding),
                                             ("f_inter", model.slice_transformer),
                                             ("head", model.projection_3d))}
    assert losses[0.1] == losses[1.0]  # the forward pass is the identity
    for name in ("encoder", "g"):  # everything below f_inter gets a tenth
        scaled = 0.1 * grads[1.0][name]  # float rounding differs with the gradient's magnitude: atol by scale
        torch.testing.assert_close(grads[0.1][name], scaled, rtol=1e-3, atol=1e-4 * float(scaled.abs().max()))
        assert grads[1.0][name].abs().sum() > 0
    for name in ("f_inter", "head"):  # f_inter and the heads keep their whole gradient
        torch.testing.assert_close(grads[0.1][name], grads[1.0][name])


def test_the_gradient_scale_is_typed_and_refused_where_it_means_nothing() -> None:
    assert ObjectiveConfig.paper().volume_encoder_gradient_scale == 1.0
    assert ObjectiveConfig().volume_encoder_gradient_scale == 0.1
    for value in (0.1, 0.5, 1.0):
        assert ObjectiveConfig.from_dict({"volume_encoder_gradient_scale": value}).to_dict()[
            "volume_encoder_gradient_scale"] == value
    with pytest.raises(ValueError, match="volume_encoder_gradient_scale must lie in"):
        ObjectiveConfig.from_dict({"volume_encoder_gradient_scale": 0.0})
    with pytest.raises(ValueError, match="no effect with volume_terms_train_encoder: false"):
        ObjectiveConfig.from_dict({"volume_encoder_gradient_scale": 0.5, "volume_terms_train_encoder": False})
