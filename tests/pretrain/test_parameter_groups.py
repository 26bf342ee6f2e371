"""Optimiser groups of the pretraining network (nnssl_joint/pretrain/runtime.py): weight decay and the
learning rate of the parts only the volume terms train (``optim.volume_lr_factor``); gradient clipping
per part (``optim.grad_clip_mode``)."""

from __future__ import annotations

import pytest
import torch

from nnssl_joint.errors import NnsslJointError
from nnssl_joint.models.preset import load_preset
from nnssl_joint.pretrain.config import PAPER_OPTIM, PretrainConfig
from nnssl_joint.pretrain.model import JointSSLModel
from nnssl_joint.pretrain.runtime import (
    VOLUME_HEAD_PARTS,
    VOLUME_PARTS,
    clip_gradients,
    gradient_parts,
    parameter_groups,
)
from nnssl_joint.pretrain.schedule import WarmupCosineLR
from nnssl_joint.ssl.objective import ObjectiveConfig

PROTOTYPES = {"num_prototypes_2d": 8, "num_prototypes_3d": 4}


@pytest.fixture(scope="module", params=["default", "paper"])
def model(request) -> JointSSLModel:
    """The default objective's network (with the dense head and the momentum key network of the contrastive
    volume term, whose parameters the optimiser does not train) and the paper's (neither)."""
    torch.manual_seed(0)
    objective = (ObjectiveConfig(**PROTOTYPES) if request.param == "default"
                 else ObjectiveConfig.paper(**PROTOTYPES))
    return JointSSLModel(load_preset("cpu"), 1, objective)


def _names(model, group) -> set[str]:
    ids = {id(p) for p in group["params"]}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def _trainable(model) -> set[str]:
    """The parameters the optimiser trains: all but the momentum key network's (a moving average)."""
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_the_momentum_key_network_is_in_no_group_and_the_dense_head_at_the_base_rate(model):
    default = model.objective.lambda_volume_contrast > 0
    assert (model.volume_key_network is not None) == default and (model.dense_head is not None) == default
    frozen = {n for n, _ in model.named_parameters()} - _trainable(model)
    assert frozen == {n for n, _ in model.named_parameters() if n.startswith("volume_key_network.")}
    assert bool(frozen) == default
    groups = parameter_groups(model, 0.05, volume_lr_factor=0.1)
    grouped = set().union(*(_names(model, g) for g in groups))
    assert grouped == _trainable(model) and grouped.isdisjoint(frozen)
    dense = {n for n in grouped if n.startswith("dense_head.")}
    assert bool(dense) == default and dense <= _names(model, groups[0]) | _names(model, groups[1])


def test_one_rate_keeps_the_two_groups_of_earlier_checkpoints(model):
    # one rate: the paper's configuration (the default before the twenty-third pass); the default is 0.1
    assert PAPER_OPTIM["volume_lr_factor"] == 1.0 and PretrainConfig().optim.volume_lr_factor == 0.1
    groups = parameter_groups(model, 0.05, PAPER_OPTIM["volume_lr_factor"])
    assert [(g["weight_decay"], g["lr_factor"]) for g in groups] == [(0.05, 1.0), (0.0, 1.0)]
    decay, no_decay = (_names(model, g) for g in groups)
    assert decay.isdisjoint(no_decay) and decay | no_decay == _trainable(model)
    assert any("prototypes" in n for n in no_decay) and all(not n.endswith(".bias") for n in decay)


def test_the_volume_parts_get_their_own_rate_and_nothing_else_does(model):
    groups = parameter_groups(model, 0.05, volume_lr_factor=0.1)
    assert [(g["weight_decay"], g["lr_factor"]) for g in groups] == [(0.05, 1.0), (0.0, 1.0), (0.05, 0.1),
                                                                     (0.0, 0.1)]
    names = [_names(model, g) for g in groups]
    assert sum(len(n) for n in names) == len(_trainable(model))  # each trained parameter once
    assert set().union(*names) == _trainable(model)
    slow = names[2] | names[3]
    assert slow == {n for n in _trainable(model) if n.split(".", 1)[0] in VOLUME_PARTS}
    assert any(n.startswith("slice_transformer.") for n in slow)
    assert any(n.startswith("encoder.") for n in names[0])
    # the schedule keeps the ratio at every epoch
    optimizer = torch.optim.AdamW(groups, lr=3e-3)
    base_lrs = [3e-3 * g["lr_factor"] for g in optimizer.param_groups]
    scheduler = WarmupCosineLR(optimizer, base_lrs, 10, 2, 0.01)
    for epoch in (0, 1, 5, 9):
        scheduler.step(epoch)
        lrs = [g["lr"] for g in optimizer.param_groups]
        assert lrs[2] == pytest.approx(0.1 * lrs[0]) and lrs[3] == pytest.approx(0.1 * lrs[1])


def test_a_factor_that_is_not_positive_is_refused_with_the_key():
    with pytest.raises(NnsslJointError, match="optim.volume_lr_factor must be > 0"):
        PretrainConfig.from_dict({"optim": {"volume_lr_factor": 0.0}})
    assert PretrainConfig.from_dict({"optim": {"volume_lr_factor": 0.1}}).optim.volume_lr_factor == 0.1


def _loss_with_a_loud_head(model: JointSSLModel) -> torch.Tensor:
    """A quiet gradient on f_inter and a gradient 1e4 times larger on the 3D head."""
    quiet = sum(p.sum() for p in model.slice_transformer.parameters()) * 1e-3
    loud = sum(p.sum() for p in model.projection_3d.parameters()) * 10.0
    return quiet + loud


def test_per_part_clipping_keeps_one_part_from_shrinking_another(model):
    parts = dict(gradient_parts(model))
    assert {"encoder", "slice_transformer", "projection_3d", "inter_loss"} <= set(parts)
    ids = {id(p) for params in parts.values() for p in params}
    assert ids == {id(p) for p in model.parameters() if p.requires_grad}  # every parameter in one part
    norms = {}
    for mode in ("global", "per_part"):
        model.zero_grad(set_to_none=True)
        _loss_with_a_loud_head(model).backward()
        before = torch.nn.utils.get_total_norm([p.grad for p in model.slice_transformer.parameters()])
        clip_gradients(model, 3.0, mode)
        after = {name: float(torch.nn.utils.get_total_norm([p.grad for p in parts[name]]))
                 for name in ("slice_transformer", "projection_3d")}
        norms[mode] = (float(before), after)
    before, after = norms["global"]
    # one global norm: the loud head sets the factor, f_inter's step shrinks with it
    assert after["slice_transformer"] < 0.01 * before
    assert after["projection_3d"] == pytest.approx(3.0, rel=1e-4)
    before, after = norms["per_part"]
    # per part: f_inter (under the limit) keeps its gradient, the head is clipped on its own
    assert after["slice_transformer"] == pytest.approx(before, rel=1e-6)
    assert after["projection_3d"] == pytest.approx(3.0, rel=1e-4)
    model.zero_grad(set_to_none=True)


def test_the_clip_mode_is_typed_and_refused_with_the_key():
    # the default since the twenty-third pass; the paper's configuration clips one global norm
    assert PretrainConfig().optim.grad_clip_mode == "per_part"
    assert PretrainConfig.from_dict({"optim": PAPER_OPTIM}).optim.grad_clip_mode == "global"
    loaded = PretrainConfig.from_dict({"optim": {"grad_clip_mode": "global"}})
    assert loaded.optim.grad_clip_mode == "global"
    loaded = PretrainConfig.from_dict({"optim": {"grad_clip_mode": "per_part"}})
    assert loaded.optim.grad_clip_mode == "per_part"
    with pytest.raises(NnsslJointError, match="optim.grad_clip_mode must be one of"):
        PretrainConfig.from_dict({"optim": {"grad_clip_mode": "parts"}})


def test_an_optimizer_the_trainer_does_not_build_is_refused_with_the_key():
    # the trainer builds AdamW only: another name must not be accepted and silently ignored
    assert PretrainConfig.from_dict({"optim": {"optimizer": "adamw"}}).optim.optimizer == "adamw"
    with pytest.raises(NnsslJointError, match="optim.optimizer must be one of.*'sgd'"):
        PretrainConfig.from_dict({"optim": {"optimizer": "sgd"}})


def test_the_3d_head_rate_sets_apart_only_the_head_and_prototypes(model):
    all_names = _trainable(model)
    # null (the default) keeps the groups of the test above; the head at volume_lr_factor's own value is the
    # same configuration, so it must give those groups too, not a second pair at the same rate
    null, explicit = parameter_groups(model, 0.05, 0.1), parameter_groups(model, 0.05, 0.1, 0.1)
    assert [(_names(model, g), g["lr_factor"]) for g in explicit] == [(_names(model, g), g["lr_factor"])
                                                                      for g in null]
    groups = parameter_groups(model, 0.05, volume_lr_factor=0.1, volume_head_lr_factor=1.0)
    # the head's factor equals the base rate: it joins the base groups, f_inter keeps the slow ones
    assert [(g["weight_decay"], g["lr_factor"]) for g in groups] == [(0.05, 1.0), (0.0, 1.0), (0.05, 0.1),
                                                                     (0.0, 0.1)]
    names = [_names(model, g) for g in groups]
    head = {n for n in all_names if n.split(".", 1)[0] in VOLUME_HEAD_PARTS}
    assert any(n.startswith("projection_3d.") for n in head) and any("prototypes" in n for n in head)
    assert head <= names[0] | names[1]
    assert names[2] | names[3] == {n for n in all_names if n.split(".", 1)[0] in VOLUME_PARTS} - head
    # three distinct rates: three pairs of groups, each parameter exactly once
    groups = parameter_groups(model, 0.05, volume_lr_factor=0.1, volume_head_lr_factor=0.5)
    assert [g["lr_factor"] for g in groups] == [1.0, 1.0, 0.1, 0.1, 0.5, 0.5]
    names = [_names(model, g) for g in groups]
    assert sum(len(n) for n in names) == len(all_names) and names[4] | names[5] == head
    # with one rate for f_inter and the base, only the head is split off
    groups = parameter_groups(model, 0.05, volume_head_lr_factor=3.0)
    assert [g["lr_factor"] for g in groups] == [1.0, 1.0, 3.0, 3.0]
    assert _names(model, groups[2]) | _names(model, groups[3]) == head


def test_the_3d_head_rate_is_typed_and_refused_with_the_key():
    assert PretrainConfig().optim.volume_head_lr_factor is None
    cfg = PretrainConfig.from_dict({"optim": {"volume_lr_factor": 0.1, "volume_head_lr_factor": 1.0}})
    assert (cfg.optim.volume_lr_factor, cfg.optim.volume_head_lr_factor) == (0.1, 1.0)
    assert PretrainConfig.from_dict(cfg.to_dict()).optim.volume_head_lr_factor == 1.0  # round trip
    with pytest.raises(NnsslJointError, match="optim.volume_head_lr_factor must be > 0"):
        PretrainConfig.from_dict({"optim": {"volume_head_lr_factor": -1.0}})
