"""objective.epsilon_3d: L_inter's own Sinkhorn epsilon, leaving the 2D losses at objective.epsilon."""

from __future__ import annotations

import pytest
import torch

from nnssl_joint.models.preset import load_preset
from nnssl_joint.pretrain.config import PretrainConfig
from nnssl_joint.pretrain.model import JointSSLModel
from nnssl_joint.ssl.objective import TERM_INTER, TERM_INTRA_3D, ObjectiveConfig


def _volumes() -> dict:
    g = torch.Generator().manual_seed(3)
    views = torch.randn(4, 2, 1, 6, 32, 32, generator=g)
    return {"views": views, "valid": torch.ones(4, 6, dtype=torch.bool)}


def _losses(epsilon_3d: float | None) -> tuple[JointSSLModel, dict]:
    torch.manual_seed(0)
    # the paper's objective: the volume batch carries no case numbers for the default's contrastive term
    objective = ObjectiveConfig.paper(num_prototypes_2d=8, num_prototypes_3d=4, queue_length_3d=0,
                                      epsilon_3d=epsilon_3d)
    model = JointSSLModel(load_preset("cpu"), 1, objective)
    with torch.no_grad():
        return model, model(None, _volumes(), 0, objective.stage_at(0))


def test_null_falls_back_to_the_shared_epsilon() -> None:
    model, _ = _losses(None)
    assert model.inter_loss.epsilon == model.intra_loss.epsilon == 0.05


def test_it_changes_l_inter_and_nothing_else() -> None:
    _, shared = _losses(None)
    own_model, own = _losses(0.5)
    assert own_model.inter_loss.epsilon == 0.5 and own_model.intra_loss.epsilon == 0.05
    # same weights, same input: the slice-level term (2D prototypes, shared epsilon) is unchanged ...
    assert torch.equal(shared[TERM_INTRA_3D], own[TERM_INTRA_3D])
    # ... and L_inter's codes are softer with the larger epsilon, so its value moves
    assert not torch.allclose(shared[TERM_INTER], own[TERM_INTER])


def test_typed_refused_where_it_has_no_effect_and_stored() -> None:
    assert ObjectiveConfig.from_dict({"epsilon_3d": 1}).epsilon_3d == 1.0
    for bad, match in (({"epsilon_3d": 0.0}, "> 0 or null"), ({"epsilon_3d": True}, "number or null"),
                       ({"epsilon_3d": "0.1"}, "number or null"),
                       ({"epsilon_3d": 0.1, "clustering": "deepcluster"}, "no effect"),
                       ({"epsilon_3d": 0.1, "inter_codes": "centering"}, "no effect")):
        with pytest.raises(ValueError, match=match):
            ObjectiveConfig.from_dict(bad)
    # the effective configuration (what checkpoints store) carries it, and a null round-trips as null
    config = PretrainConfig.from_dict({"objective": {"epsilon_3d": 0.2}})
    assert config.to_dict()["objective"]["epsilon_3d"] == 0.2
    assert PretrainConfig.from_dict(config.to_dict()).objective.epsilon_3d == 0.2
    assert PretrainConfig.from_dict(PretrainConfig().to_dict()).objective.epsilon_3d is None
