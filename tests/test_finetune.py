"""Fine-tuning configuration and learning-rate recipes (nnssl_joint/finetune.py)."""

from __future__ import annotations

import pytest
import torch

from nnssl_joint.errors import NnsslJointError
from nnssl_joint.finetune import (
    RESUME_CHECKPOINTS,
    FinetuneConfig,
    GroupPolyLR,
    check_pretrained_encoder_stages,
    continues_from_checkpoint,
    freeze_pretrained,
    new_parts_state,
    poly_with_warmup,
    split_parameters,
    warmup_then_poly,
)


def test_nnunet_warmup_recipe_matches_nnunets_own_schedulers():
    from nnunetv2.training.lr_scheduler.warmup import Lin_incr_LRScheduler, PolyLRScheduler_offset

    num_epochs, warmup, lr = 20, 5, 1e-3
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr)
    ours = GroupPolyLR(optimizer, [lr], num_epochs, warmup, recipe="nnunet_warmup")
    reference_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr)
    linear = Lin_incr_LRScheduler(reference_opt, lr, warmup)
    poly = PolyLRScheduler_offset(reference_opt, lr, num_epochs, warmup)
    for epoch in range(num_epochs):
        ours.step(epoch)
        (linear if epoch < warmup else poly).step(epoch)
        assert optimizer.param_groups[0]["lr"] == pytest.approx(reference_opt.param_groups[0]["lr"]), epoch
    assert warmup_then_poly(0, 10, 0) == 1.0 == poly_with_warmup(0, 10, 0)  # no warm-up: nnU-Net's poly


def test_pretrained_networks_start_at_their_own_learning_rate():
    config = FinetuneConfig(recipe="nnunet_warmup", warmup_epochs=2, num_epochs=10,
                            pretrained_initial_lr=1e-3)
    assert config.initial_lr_for(pretrained=True) == 1e-3 and config.initial_lr_for(pretrained=False) == 1e-2
    assert FinetuneConfig().initial_lr_for(pretrained=True) == 1e-2


@pytest.mark.parametrize("values, match", [
    ({"recipe": "cosine"}, "recipe must be one of plugin, nnunet_warmup"),
    ({"recipe": "nnunet_warmup", "freeze_pretrained_epochs": 2},
     "whole network.*freeze_pretrained_epochs to 0"),
    ({"recipe": "nnunet_warmup", "warmup_epochs": 5, "num_epochs": 5},
     r"warmup_epochs \(5\) < num_epochs \(5\)"),
    ({"pretrained_initial_lr": 0}, "pretrained_initial_lr must be > 0"),
    ({"new_parts_init": "seed"}, "new_parts_init must be one of file, run, got 'seed'"),
    ({"pretrained_encoder_stages": -1, "new_parts_init": "run"}, "pretrained_encoder_stages must be an int"),
    ({"pretrained_encoder_stages": True, "new_parts_init": "run"}, "got True"),
    ({"pretrained_encoder_stages": 2}, "needs new_parts_init 'run' \\(got 'file'\\)"),
    ({"pretrained_encoder_stages": [1, 1], "new_parts_init": "run"},
     "distinct stage indices >= 0, got \\[1, 1\\]"),
    ({"pretrained_encoder_stages": [2, -1], "new_parts_init": "run"}, "distinct stage indices"),
    ({"pretrained_encoder_stages": [True], "new_parts_init": "run"}, "distinct stage indices"),
    ({"pretrained_encoder_stages": "1-4", "new_parts_init": "run"}, "pretrained_encoder_stages"),
])
def test_recipe_settings_are_checked_with_the_fix(values, match):
    with pytest.raises(NnsslJointError, match=match):
        FinetuneConfig.from_dict(values)


@pytest.mark.parametrize("recipe", ["plugin", "nnunet_warmup"])
def test_warm_up_acts_only_on_runs_from_pretrained_weights(recipe):
    """From random initialisation the schedule is stock nnU-Net's poly decay (nnUNetTrainer's
    PolyLRScheduler) at every epoch, whatever warmup_epochs says; from pretrained weights it warms up."""
    from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
    config = FinetuneConfig(warmup_epochs=2, num_epochs=10, recipe=recipe)
    assert config.warmup_epochs_for(pretrained=True) == 2 and config.warmup_epochs_for(pretrained=False) == 0
    scratch = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-2)
    stock = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-2)
    ours = GroupPolyLR(scratch, [1e-2], 10, config.warmup_epochs_for(pretrained=False), recipe=recipe)
    reference = PolyLRScheduler(stock, 1e-2, 10)
    for epoch in range(10):
        ours.step(epoch)
        reference.step(epoch)
        assert scratch.param_groups[0]["lr"] == pytest.approx(stock.param_groups[0]["lr"], rel=1e-12), epoch
    warm = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-2)
    GroupPolyLR(warm, [1e-2], 10, config.warmup_epochs_for(pretrained=True), recipe=recipe).step(0)
    assert warm.param_groups[0]["lr"] < 1e-2


def test_freezing_and_the_lower_rate_act_only_on_runs_from_pretrained_weights():
    config = FinetuneConfig(freeze_pretrained_epochs=3, pretrained_lr_factor=0.1)
    assert config.pretrained_parts_schedule(pretrained=True) == (0.1, 3)
    # from scratch nothing is pretrained: the encoder trains like the rest, so one file serves both arms
    assert config.pretrained_parts_schedule(pretrained=False) == (1.0, 0)
    assert FinetuneConfig().pretrained_parts_schedule(pretrained=True) == (1.0, 0)


@pytest.mark.parametrize("checkpoint", RESUME_CHECKPOINTS)
def test_only_a_resume_that_finds_a_checkpoint_continues_the_earlier_run(tmp_path, checkpoint):
    train = ["nnUNetv2_train", "503", "2d", "0", "-tr", "JointSSLFinetuneTrainer"]
    # nothing to continue from: nnU-Net starts a new training, so the earlier start record must not count
    assert not continues_from_checkpoint(tmp_path, train + ["--c"])
    (tmp_path / checkpoint).write_bytes(b"")
    assert continues_from_checkpoint(tmp_path, train + ["--c"])
    # a plain start in a folder with an earlier run is a new training (scratch after a pretrained run)
    assert not continues_from_checkpoint(tmp_path, train)
    assert not continues_from_checkpoint(tmp_path, train + ["-pretrained_weights", "w.pth"])
    # validation of a finished run: nnU-Net loads checkpoint_final, the start record stays as it was
    assert continues_from_checkpoint(tmp_path, train + ["--val"])
    assert continues_from_checkpoint(tmp_path, train + ["--val", "--val_best"])


def test_new_parts_state_leaves_out_every_pretrained_tensor_and_its_second_name():
    """Stock PlainConvUNet registers its encoder twice (encoder.*, decoder.encoder.*): restoring the copy of
    the new parts must not touch the pretrained encoder under either name."""
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    net = PlainConvUNet(1, 3, (8, 16, 32), torch.nn.Conv2d, 3, (1, 2, 2), 2, 3, (1, 1), False,
                        torch.nn.InstanceNorm2d, {"affine": True}, nonlin=torch.nn.LeakyReLU)
    state = net.state_dict()
    assert any(k.startswith("decoder.encoder.") for k in state)
    kept = new_parts_state(net)
    assert kept and all(k.startswith("decoder.") and not k.startswith("decoder.encoder.") for k in kept)
    assert set(kept) == {k for k in state if k.startswith(("decoder.stages", "decoder.transpconvs",
                                                           "decoder.seg_layers"))}
    # copies, not views: a later change of the network leaves them as they were
    before = {k: v.clone() for k, v in kept.items()}
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    assert all(torch.equal(kept[k], before[k]) for k in kept)


def test_pretrained_encoder_stages_transfers_the_shallow_stages_only():
    """pretrained_encoder_stages N: encoder stages 0..N-1 are the transferred (pretrained) group; deeper
    stages, slice embedding and slice Transformer join the new parts (restored from the run's draw, trained
    and frozen like the decoder)."""
    from nnssl_joint.models.downstream import SliceWiseUNet3D

    net = SliceWiseUNet3D(1, 3, True, "cpu")
    n_stages = len(net.encoder.stages)
    assert n_stages >= 3
    state = net.state_dict()
    everything = new_parts_state(net)
    shallow = new_parts_state(net, 2)
    moved = set(shallow) - set(everything)
    assert set(everything) < set(shallow)
    assert moved == {k for k in state if k.startswith(("slice_embedding.", "slice_transformer."))
                     or (k.startswith("encoder.stages.") and int(k.split(".")[2]) >= 2)}
    assert any(k.startswith("encoder.stages.2.") for k in moved) and not any(
        k.startswith(("encoder.stages.0.", "encoder.stages.1.")) for k in shallow)
    pretrained, other = split_parameters(net, 2)
    names = {id(p): n for n, p in net.named_parameters()}
    assert {names[id(p)].split(".")[2] for p in pretrained} == {"0", "1"}
    assert all(names[id(p)].startswith("encoder.stages.") for p in pretrained)
    assert len(pretrained) + len(other) == len(list(net.parameters()))
    assert len(split_parameters(net)[0]) > len(pretrained)
    assert freeze_pretrained(net, True, 2) == len(pretrained)
    frozen = {n for n, p in net.named_parameters() if not p.requires_grad}
    assert frozen == {names[id(p)] for p in pretrained}
    # 0 transfers nothing: every tensor is the run's own, no parameter is in the pretrained group
    assert set(new_parts_state(net, 0)) == set(state)
    assert split_parameters(net, 0)[0] == []
    check_pretrained_encoder_stages(net, n_stages)
    with pytest.raises(NnsslJointError, match=f"pretrained_encoder_stages {n_stages + 1} but the network's "
                                              f"encoder has {n_stages} stages"):
        check_pretrained_encoder_stages(net, n_stages + 1)


def test_pretrained_encoder_stages_as_a_list_transfers_the_named_stages_only():
    """pretrained_encoder_stages [1, ..., n-1]: every stage but the first is transferred; stage 0, the slice
    embedding and the slice Transformer are new parts. A list naming a stage the network does not have is
    refused with the stage count."""
    from nnssl_joint.models.downstream import SliceWiseUNet3D

    net = SliceWiseUNet3D(1, 3, True, "cpu")
    n_stages = len(net.encoder.stages)
    deep = list(range(1, n_stages))
    config = FinetuneConfig.from_dict({"pretrained_encoder_stages": [n_stages - 1, *deep[:-1]],
                                       "new_parts_init": "run"})
    assert config.pretrained_encoder_stages == deep  # stored sorted, as JSON writes it
    state = net.state_dict()
    new = set(new_parts_state(net, deep))
    assert new == {k for k in state if not k.startswith("encoder.")
                   or k.startswith(("slice_embedding.", "slice_transformer.", "encoder.stages.0."))}
    assert {k.split(".")[2] for k in state if k.startswith("encoder.stages.") and k not in new} == {
        str(i) for i in deep}
    pretrained, _ = split_parameters(net, deep)
    names = {id(p): n for n, p in net.named_parameters()}
    assert {names[id(p)].split(".")[2] for p in pretrained} == {str(i) for i in deep}
    assert freeze_pretrained(net, True, deep) == len(pretrained)
    assert all(p.requires_grad for p in net.encoder.stages[0].parameters())
    # the empty list transfers nothing, like 0
    assert set(new_parts_state(net, [])) == set(state) and split_parameters(net, [])[0] == []
    check_pretrained_encoder_stages(net, deep)
    with pytest.raises(NnsslJointError, match=f"names stage {n_stages} but the network's encoder has "
                                              f"{n_stages} stages"):
        check_pretrained_encoder_stages(net, [0, n_stages])
