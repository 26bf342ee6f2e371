"""``objective.volume_view_shift``: the 3D views' f_inter passes read sub-windows from different starts."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch

import nnssl_joint.pretrain.model as model_module
from nnssl_joint.data.augment import coordinate_maps
from nnssl_joint.errors import NnsslJointError
from nnssl_joint.models.masked_prediction import sample_sub_window_starts, take_sub_windows
from nnssl_joint.models.preset import load_preset
from nnssl_joint.pretrain.model import JointSSLModel
from nnssl_joint.ssl.objective import (
    TERM_DENSE,
    TERM_INTRA_3D,
    TERM_MASK,
    TERM_VOLUME_CONTRAST,
    ObjectiveConfig,
)

N = 6


def test_starts_are_uniform_over_0_to_shift_and_every_sub_window_holds_a_valid_slice():
    valid = torch.zeros(2, 8, dtype=torch.bool)
    valid[0] = True
    valid[1, 3:5] = True  # a 2-slice volume centred in its padded window
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_sub_window_starts(valid, 6, 2, generator=g) for _ in range(1400)])
    assert draws.shape == (1400, 2, 2) and draws.dtype == torch.int64
    full = torch.bincount(draws[:, 0].flatten(), minlength=7)
    assert full.tolist() != [0] * 7 and (full > 300).all() and (full < 500).all()  # 2800 / 7 = 400 each
    short = set(draws[:, 1].flatten().tolist())
    assert short == {2, 3, 4}  # sub-windows [a, a + 2) that reach slice 3 or 4
    assert not torch.equal(draws[:, 0, 0], draws[:, 0, 1])  # the views draw independently
    assert sample_sub_window_starts(valid, 0, 2).eq(0).all()
    with pytest.raises(ValueError, match="shift must lie in \\[0, 8\\).*got 8"):
        sample_sub_window_starts(valid, 8, 2)
    empty = valid.clone()
    empty[1] = False
    with pytest.raises(ValueError, match="every window needs a valid slice"):
        sample_sub_window_starts(empty, 2, 2)


def test_take_sub_windows_reads_each_rows_own_positions():
    x = torch.arange(12).view(2, 6)[..., None].expand(2, 6, 3)
    out = take_sub_windows(x, torch.tensor([0, 2]), 4)
    assert out[..., 0].tolist() == [[0, 1, 2, 3], [8, 9, 10, 11]]
    with pytest.raises(ValueError, match="do not fit in 6 positions"):
        take_sub_windows(x, torch.tensor([0, 3]), 4)
    with pytest.raises(ValueError, match="starts must be \\(2,\\)"):
        take_sub_windows(x, torch.tensor([0]), 4)


def _batches(view: int = 32, mask: torch.Tensor | None = None) -> tuple[dict, dict]:
    g = torch.Generator().manual_seed(0)
    maps = coordinate_maps(view, view)
    slices = {"global_views": torch.randn(4, 2, 1, view, view, generator=g), "small_views": None,
              "global_coords": maps[None, None].expand(4, 2, -1, -1, -1).clone()}
    valid = torch.ones(3, N, dtype=torch.bool)
    valid[1, 4:] = False
    volumes = {"views": torch.randn(3, 2, 1, N, view, view, generator=g), "valid": valid,
               "case": torch.tensor([0, 1, 2]), "coords": maps[None, None].expand(3, 2, -1, -1, -1).clone()}
    if mask is not None:
        volumes["mask"] = mask
    return slices, volumes


def _model(**values) -> tuple[JointSSLModel, ObjectiveConfig]:
    objective = ObjectiveConfig(num_prototypes_2d=8, num_prototypes_3d=4, **values)
    torch.manual_seed(0)
    return JointSSLModel(load_preset("cpu"), 1, objective), objective


def _record_f_inter(module: torch.nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    module.register_forward_pre_hook(
        lambda _m, args: seen.append((args[0].detach().clone(), args[1].clone())))
    return seen


STARTS = torch.tensor([[0, 2], [1, 0], [2, 1]])


def test_each_view_and_its_momentum_keys_read_their_own_sub_window_and_the_slice_terms_the_whole(monkeypatch):
    shifted, objective = _model(volume_view_shift=2, lambda_mask=0.0)
    whole = copy.deepcopy(shifted)
    whole.objective = replace(objective, volume_view_shift=0)
    monkeypatch.setattr(model_module, "sample_sub_window_starts", lambda valid, shift, n_views: STARTS)
    runs = {}
    for name, model in (("shifted", shifted), ("whole", whole)):
        online = _record_f_inter(model.slice_transformer)
        keys = _record_f_inter(model.volume_key_network["slice_transformer"])
        torch.manual_seed(1)
        runs[name] = model(*_batches(), 0, objective.stage_at(0)), online, keys
    out, online, keys = runs["shifted"]
    ref_out, ref_online, ref_keys = runs["whole"]
    assert len(online) == len(keys) == len(ref_online) == 2  # one f_inter pass per view
    for seen, reference in ((online, ref_online), (keys, ref_keys)):
        for view in range(2):
            tokens, valid = seen[view]
            full_tokens, full_valid = reference[view]
            assert tokens.shape[1] == N - 2 and full_tokens.shape[1] == N
            for b, start in enumerate(STARTS[:, view].tolist()):
                torch.testing.assert_close(tokens[b], full_tokens[b, start:start + N - 2])
                assert valid[b].tolist() == full_valid[b, start:start + N - 2].tolist()
    # the per-slice terms read the whole window either way
    torch.testing.assert_close(out[TERM_INTRA_3D], ref_out[TERM_INTRA_3D])
    torch.testing.assert_close(out[TERM_DENSE], ref_out[TERM_DENSE])
    assert torch.isfinite(out[TERM_VOLUME_CONTRAST])
    assert not torch.allclose(out[TERM_VOLUME_CONTRAST], ref_out[TERM_VOLUME_CONTRAST])
    sum(v for k, v in out.items() if not k.startswith("_")).backward()
    assert sum(float(p.grad.abs().sum()) for p in shifted.slice_transformer.parameters()) > 0


def test_the_mask_stays_on_the_same_slices_of_both_views(monkeypatch):
    model, objective = _model(volume_view_shift=2)
    monkeypatch.setattr(model_module, "sample_sub_window_starts", lambda valid, shift, n_views: STARTS)
    mask = torch.zeros(3, N, dtype=torch.bool)
    mask[:, 3] = True  # slice 3 of every window
    online = _record_f_inter(model.slice_transformer)
    out = model(*_batches(mask=mask), 0, objective.stage_at(0))
    assert torch.isfinite(out[TERM_MASK]) and float(out[TERM_MASK].detach()) > 0
    token = model.masked_modeling.mask_token.detach()
    for view, (tokens, _) in enumerate(online):
        is_token = (tokens == token).all(-1)
        expected = torch.zeros_like(is_token)
        expected[torch.arange(3), 3 - STARTS[:, view]] = True
        assert is_token.tolist() == expected.tolist()


def test_the_default_draws_no_sub_windows_and_a_shift_as_long_as_the_window_is_refused(monkeypatch):
    def refuse(*_args, **_kwargs):
        raise AssertionError("the default must not draw sub-windows")

    model, objective = _model()
    assert objective.volume_view_shift == 0
    monkeypatch.setattr(model_module, "sample_sub_window_starts", refuse)
    model(*_batches(), 0, objective.stage_at(0))
    model, objective = _model(volume_view_shift=N)
    with pytest.raises(NnsslJointError, match="volume_view_shift=6 .*hold 6 slices.*must be < 6"):
        model(*_batches(), 0, objective.stage_at(0))


def test_the_key_is_typed_and_recorded():
    assert ObjectiveConfig.from_dict({"volume_view_shift": 4}).to_dict()["volume_view_shift"] == 4
    with pytest.raises(ValueError, match="volume_view_shift must be >= 0"):
        ObjectiveConfig(volume_view_shift=-1)
    with pytest.raises((TypeError, ValueError), match="volume_view_shift"):
        ObjectiveConfig.from_dict({"volume_view_shift": 1.5})
