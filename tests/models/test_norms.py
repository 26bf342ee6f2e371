"""VolumeInstanceNorm2d's window mode: pretraining batches of 2D items and padded volume windows."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nnssl_joint.models.norms import VolumeInstanceNorm2d, use_volume_statistics, window_statistics


def _norm(channels: int = 3, seed: int = 0) -> VolumeInstanceNorm2d:
    torch.manual_seed(seed)
    norm = VolumeInstanceNorm2d(channels)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2.0)
        norm.bias.uniform_(-1.0, 1.0)
    return norm


def _batch(leading: int, windows: int, slices: int, channels: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    rows = leading + windows * slices
    scale = torch.linspace(0.5, 4.0, rows)[:, None, None, None]  # rows differ in contrast and brightness
    return torch.randn(rows, channels, 6, 7, generator=g) * scale + scale


@pytest.mark.parametrize("padded", [True, False])  # with and without padding slices
def test_window_rows_share_the_statistics_of_their_valid_slices_and_nothing_else(padded: bool):
    norm = _norm()
    leading, w, n = 4, 3, 5
    valid = torch.ones(w, n, dtype=torch.bool)
    if padded:
        valid[1, 3:] = False  # window 1: two padding slices
    x = _batch(leading, w, n)
    with window_statistics(norm, valid, leading_rows=leading):
        got = norm(x)
    assert norm.windows is None  # restored after the block

    plain_2d = nn.InstanceNorm2d(3, affine=True)
    plain_2d.load_state_dict(norm.state_dict())
    plain_3d = nn.InstanceNorm3d(3, affine=True)
    plain_3d.load_state_dict(norm.state_dict())
    # the 2D items keep their own statistics
    torch.testing.assert_close(got[:leading], plain_2d(x[:leading]))
    windows = x[leading:].unflatten(0, (w, n))
    out = got[leading:].unflatten(0, (w, n))
    for i in range(w):
        k = int(valid[i].sum())
        # a window's valid slices: InstanceNorm3d over exactly those slices
        expected = plain_3d(windows[i, :k].transpose(0, 1)[None])[0].transpose(0, 1)
        torch.testing.assert_close(out[i, :k], expected, rtol=1e-4, atol=1e-4)
        # padding slices: per-slice statistics, as before
        if k < n:
            torch.testing.assert_close(out[i, k:], plain_2d(windows[i, k:]), rtol=1e-4, atol=1e-4)
    # pooled statistics keep the slices' contrast apart (per slice, each would have unit variance)
    spread = ((out[0] - norm.bias[None, :, None, None]) / norm.weight[None, :, None, None]).std(dim=(2, 3))
    assert spread[0].mean() < 0.8 * spread[-1].mean()  # per slice: both 1


def test_padding_slices_and_other_windows_do_not_move_a_window():
    norm = _norm(seed=2)
    valid = torch.tensor([[True, True, False, False], [True, True, True, True]])
    x = _batch(2, 2, 4)
    with window_statistics(norm, valid, leading_rows=2):
        base = norm(x)
        changed = x.clone()
        changed[2 + 2: 2 + 4] = 100.0 * torch.randn_like(changed[2 + 2: 2 + 4])  # window 0's padding
        changed[0] += 5.0  # a 2D item
        again = norm(changed)
        torch.testing.assert_close(again[2:4], base[2:4])  # window 0's valid slices
        torch.testing.assert_close(again[6:], base[6:])  # window 1
        moved = x.clone()
        moved[6] = 3.0 * moved[6] + 1.0  # one slice of window 1 reaches its neighbours
        assert not torch.allclose(norm(moved)[7:], base[7:], atol=1e-3)


def test_a_batch_that_does_not_fit_the_windows_names_both_counts():
    norm = _norm()
    message = "10 rows, but .* 3 leading rows \\+ 2 windows x 4 slices = 11"
    with window_statistics(norm, torch.ones(2, 4, dtype=torch.bool), leading_rows=3), \
            pytest.raises(ValueError, match=message):
        norm(torch.randn(10, 3, 5, 5))


def test_the_context_reaches_every_replaced_norm_and_leaves_plain_encoders_alone():
    encoder = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.InstanceNorm2d(4, affine=True), nn.ReLU(),
                            nn.Conv2d(4, 4, 3, padding=1), nn.InstanceNorm2d(4, affine=True))
    plain = nn.Sequential(*[m for m in encoder])  # the same modules before the replacement
    x = torch.randn(6, 1, 8, 8)
    valid = torch.ones(2, 3, dtype=torch.bool)
    reference = plain(x)
    with window_statistics(plain, valid):  # no VolumeInstanceNorm2d: nothing changes
        torch.testing.assert_close(plain(x), reference)
    norms = use_volume_statistics(encoder)
    assert len(norms) == 2
    torch.testing.assert_close(encoder(x), reference)  # outside the block: per slice, same parameters
    with window_statistics(encoder, valid):
        assert all(n.windows is not None for n in norms)
        pooled = encoder(x)
    assert all(n.windows is None for n in norms)
    assert not torch.allclose(pooled, reference, atol=1e-3)
