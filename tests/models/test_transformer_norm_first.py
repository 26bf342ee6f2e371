"""The preset's ``transformer.norm_first`` and ``transformer.zero_init_residual`` (issue 12's stable f_inter),
and preset dicts written before those keys existed."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch import nn

from nnssl_joint.models.encoder import build_slice_transformer
from nnssl_joint.models.preset import ArchitecturePreset, load_preset, same_preset


def _preset(**transformer) -> ArchitecturePreset:
    cpu = load_preset("cpu")
    return replace(cpu, transformer=replace(cpu.transformer, **transformer))


def test_the_keys_default_to_the_authors_layer_and_build_what_they_name():
    cpu = load_preset("cpu")
    assert (cpu.transformer.norm_first, cpu.transformer.zero_init_residual) == (False, False)
    plain = build_slice_transformer(cpu)
    assert isinstance(plain.final_norm, nn.Identity) and not plain.layers[0].norm_first
    assert plain.layers[0].ffn[-1].weight.abs().sum() > 0
    pre = build_slice_transformer(_preset(norm_first=True))
    assert isinstance(pre.final_norm, nn.LayerNorm) and all(layer.norm_first for layer in pre.layers)
    assert "final_norm.weight" in pre.state_dict() and "final_norm.weight" not in plain.state_dict()
    zero = build_slice_transformer(_preset(zero_init_residual=True))
    for layer in zero.layers:
        for last in (layer.attention.to_out, layer.ffn[-1]):
            assert last.weight.abs().sum() == 0 and last.bias.abs().sum() == 0
        assert layer.attention.to_q.weight.abs().sum() > 0  # only the branches' last maps start at zero


def test_pre_norm_with_zero_branches_starts_as_its_final_layer_norm_and_then_learns():
    torch.manual_seed(0)
    net = build_slice_transformer(_preset(norm_first=True, zero_init_residual=True)).train()
    tokens = torch.randn(3, 6, net.dim) * 5 + 2
    valid = torch.ones(3, 6, dtype=torch.bool)
    valid[1, 4:] = False
    per_slice, _ = net(tokens, valid)
    torch.testing.assert_close(per_slice[valid], net.final_norm(tokens)[valid])
    # the post-norm stack with the same zero branches is not the identity: it re-normalises every layer
    post = build_slice_transformer(_preset(zero_init_residual=True)).train()
    assert not torch.allclose(post(tokens, valid)[0][valid], tokens[valid])
    # the zero maps get a gradient at the first step (the maps before them follow once these move)
    (per_slice[valid] * torch.randn_like(per_slice[valid])).sum().backward()
    for layer in net.layers:
        assert layer.attention.to_out.weight.grad.abs().sum() > 0
        assert layer.ffn[-1].weight.grad.abs().sum() > 0


def test_the_keys_are_typed_and_recorded_and_old_preset_dicts_still_match():
    d = _preset(norm_first=True, zero_init_residual=True).to_dict()
    assert d["transformer"]["norm_first"] is True and d["transformer"]["zero_init_residual"] is True
    assert ArchitecturePreset.from_dict(d).transformer.norm_first is True
    bad = load_preset("cpu").to_dict()
    bad["transformer"]["norm_first"] = "yes"
    with pytest.raises(ValueError, match="transformer.norm_first must be true or false, got 'yes'"):
        ArchitecturePreset.from_dict(bad)
    # a checkpoint or plans file written before the keys existed describes the default architecture
    current = load_preset("cpu").to_dict()
    old = load_preset("cpu").to_dict()
    for key in ("norm_first", "zero_init_residual", "attention", "input_norm"):
        del old["transformer"][key]
    assert old != current and same_preset(old, current) and same_preset(current, old)
    assert not same_preset(old, _preset(norm_first=True).to_dict())
    assert not same_preset(current, load_preset("gpu").to_dict())
    assert same_preset(None, None) and not same_preset(None, current)
    assert not same_preset({"transformer": {"unknown": 1}}, current)  # unparsable: compared as it is
