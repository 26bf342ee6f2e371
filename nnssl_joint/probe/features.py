"""Features of frozen pretrained parts: dense per-pixel features of f_intra, slice embeddings, volume
windows and volume features Z (Nguyen et al., AAAI 2023: Z = normalize(mean_n f_inter(E)_n))."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nnssl_joint.models.norms import grouped_statistics, window_statistics


def module_device(module: nn.Module) -> torch.device:
    """Where a module's parameters live (CPU for a module without any): inputs are moved there."""
    return next(module.parameters(), torch.empty(0)).device


def pad_in_plane(slices: Tensor, multiple: int) -> Tensor:
    """Zero-pad (M, C, H, W) at the bottom/right to multiples of ``multiple`` (nnU-Net pads with 0 too)."""
    h, w = slices.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    return F.pad(slices, (0, pw, 0, ph)) if ph or pw else slices


def statistics_chunks(z: int, group: int, batch_slices: int) -> list[tuple[int, int, int]]:
    """(forward start, forward end, first slice to yield) per encoder forward over ``z`` slices.
    ``group`` 1: chunks of ``batch_slices`` (per-slice statistics). ``group`` > 1: consecutive groups of
    ``group`` slices share statistics (as the target network's patches of that depth do); the last group
    ends at slice ``z`` and overlaps the one before it, yielding only its new slices, so every group has
    ``min(group, z)`` slices."""
    if group <= 1:
        return [(s, min(s + batch_slices, z), s) for s in range(0, z, batch_slices)]
    group = min(group, z)
    chunks = []
    for start in range(0, z, group):
        begin = min(start, z - group)
        chunks.append((begin, begin + group, start))
    return chunks


def _check_context(norm_slices: int, context: tuple[nn.Module, nn.Module] | None,
                   context_slices: int) -> None:
    if (context is None) != (context_slices <= 0):
        raise ValueError("the volume context needs both the (slice_embedding, slice_transformer) pair and "
                         f"context_slices > 0, got context={context is not None}, "
                         f"context_slices={context_slices}")
    if norm_slices > 1 and context_slices > 0 and norm_slices != context_slices:
        raise ValueError(f"norm_slices ({norm_slices}) and context_slices ({context_slices}) are both the "
                         "target network's patch depth and must agree")


def _group_forwards(encoder: nn.Module, image: np.ndarray, total_stride: int, batch_slices: int,
                    norm_slices: int, context: tuple[nn.Module, nn.Module] | None, context_slices: int
                    ) -> Iterator[tuple[int, int, int, Tensor, list[Tensor], Tensor | None]]:
    """One encoder forward per statistics/context group of a (C, Z, Y, X) volume: yields (forward start,
    forward end, first slice to yield, padded input, skips, f_inter's per-slice output or None)."""
    _check_context(norm_slices, context, context_slices)
    volume = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
    group = max(norm_slices, context_slices)
    for begin, end, first in statistics_chunks(volume.shape[1], group, batch_slices):
        x = pad_in_plane(volume[:, begin:end].transpose(0, 1), total_stride)
        if norm_slices > 1:
            with grouped_statistics(encoder, end - begin):
                skips = encoder(x)
        else:
            skips = encoder(x)
        per_slice = None
        if context is not None:
            slice_embedding, slice_transformer = context
            per_slice = slice_transformer(slice_embedding(skips)[None])[0][0].float()  # (end - begin, d)
        yield begin, end, first, x, skips, per_slice


@torch.no_grad()
def slice_context(encoder: nn.Module, image: np.ndarray, total_stride: int,
                  context: tuple[nn.Module, nn.Module], context_slices: int, norm_slices: int = 1,
                  batch_slices: int = 16) -> Tensor:
    """f_inter's per-slice output (Z, d) of every slice of a (C, Z, Y, X) volume, over the same groups of
    ``context_slices`` consecutive slices as :func:`iter_dense_features` appends it (no dense features
    are built)."""
    rows = [per_slice[first - begin:]
            for begin, _end, first, _x, _skips, per_slice in _group_forwards(
                encoder, image, total_stride, batch_slices, norm_slices, context, context_slices)]
    return torch.cat(rows)


@torch.no_grad()
def iter_dense_features(encoder: nn.Module, image: np.ndarray, total_stride: int, batch_slices: int = 16,
                        norm_slices: int = 1, context: tuple[nn.Module, nn.Module] | None = None,
                        context_slices: int = 0, context_map: Callable[[Tensor], Tensor] | None = None
                        ) -> Iterator[tuple[int, Tensor]]:
    """Dense features of every slice of a (C, Z, Y, X) volume: f_intra runs on each slice (axis Z),
    every skip is upsampled bilinearly to the slice's resolution and all skips are concatenated.
    ``norm_slices`` > 1: the encoder's InstanceNorms pool their statistics over groups of that many
    consecutive slices (:func:`statistics_chunks`, :func:`grouped_statistics`), as the target's 3d_fullres
    network does over a patch of that depth; 1: every slice has its own statistics.

    ``context`` = (g, f_inter) and ``context_slices`` > 0 (the volume-context read-out): f_inter runs over
    the slice embeddings of groups of ``context_slices`` consecutive slices (the target network's patch
    depth; the same groups as the statistics when ``norm_slices`` > 1) and its per-slice output (d values)
    is appended to every pixel of that slice, which is what ``SliceWiseUNet3D``'s ``slice_context`` reads
    through a linear map. ``context_map`` (e.g. a projection onto a few principal components, fitted by the
    caller) maps the (slices, d) output to (slices, d') before it is appended.

    Yields (first slice index, features (m, Y, X, F [+ d]) float32) for consecutive chunks of slices."""
    if context_map is not None and context is None:
        raise ValueError("context_map maps f_inter's output: it needs context and context_slices")
    h, w = image.shape[-2:]
    for begin, end, first, x, skips, per_slice in _group_forwards(encoder, image, total_stride, batch_slices,
                                                                   norm_slices, context, context_slices):
        if per_slice is not None and context_map is not None:
            per_slice = context_map(per_slice).float()
        size = x.shape[-2:]
        # the upsampled, concatenated features are the large tensor (hundreds of channels at full resolution):
        # build them for at most batch_slices slices at a time, also when a statistics group is deeper
        for lo in range(first - begin, end - begin, batch_slices):
            hi = min(lo + batch_slices, end - begin)
            up = [s[lo:hi] if s.shape[-2:] == size else
                  F.interpolate(s[lo:hi], size=size, mode="bilinear", align_corners=False) for s in skips]
            feats = torch.cat(up, 1)[..., :h, :w].permute(0, 2, 3, 1).float()
            if per_slice is not None:
                rows = per_slice[lo:hi, None, None, :].expand(hi - lo, h, w, per_slice.shape[1])
                feats = torch.cat([feats, rows], -1)
            yield begin + lo, feats


@torch.no_grad()
def slice_embeddings(encoder: nn.Module, slice_embedding: nn.Module, image: np.ndarray, total_stride: int,
                     batch_slices: int = 32) -> Tensor:
    """e_n = g(f_intra(x_n)) of every slice of a (C, Z, Y, X) volume -> (Z, d)."""
    volume = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).transpose(0, 1)
    device = module_device(encoder)
    out = [slice_embedding(encoder(pad_in_plane(volume[i:i + batch_slices],
                                                total_stride).to(device))).float().cpu()
           for i in range(0, volume.shape[0], batch_slices)]
    return torch.cat(out)


def volume_windows(volume: np.ndarray, n_slices: int, view_size: int, max_windows: int = 4) -> np.ndarray:
    """Windows of ``n_slices`` contiguous slices of a (C, Z, Y, X) volume, each slice resized in-plane to
    ``view_size`` (the pretraining views resample the whole in-plane extent onto the view, too).

    Returns (W, C, N, view, view); a volume shorter than N gives one zero-padded window."""
    c, z = volume.shape[:2]
    if z <= n_slices:
        starts = [0]
    else:
        starts = sorted({round(s) for s in np.linspace(0, z - n_slices, min(max_windows, z - n_slices + 1))})
    windows = []
    for s in starts:
        stack = torch.from_numpy(np.ascontiguousarray(volume[:, s:s + n_slices], dtype=np.float32))
        resized = F.interpolate(stack.permute(1, 0, 2, 3), size=(view_size, view_size), mode="bilinear",
                                align_corners=False).permute(1, 0, 2, 3)
        if resized.shape[1] < n_slices:
            pad = torch.zeros((c, n_slices - resized.shape[1], view_size, view_size))
            resized = torch.cat([resized, pad], 1)
        windows.append(resized)
    return torch.stack(windows).numpy()


def window_starts(depth: int, n_slices: int, max_windows: int = 4) -> list[int]:
    """First slice of each window :func:`volume_windows` cuts from a volume of ``depth`` slices."""
    if depth <= n_slices:
        return [0]
    return sorted({round(s)
                   for s in np.linspace(0, depth - n_slices, min(max_windows, depth - n_slices + 1))})


@torch.no_grad()
def embed_windows(encoder: nn.Module, slice_embedding: nn.Module, slice_transformer: nn.Module,
                  windows: np.ndarray, valid_slices: Sequence[int]) -> tuple[Tensor, Tensor]:
    """(per-slice outputs of f_inter (W, N, d), Z (W, d)) of windows (W, C, N, H, W')."""
    device = module_device(encoder)
    x = torch.from_numpy(np.ascontiguousarray(windows, dtype=np.float32)).to(device)
    w, c, n, h, wd = x.shape
    valid = torch.zeros((w, n), dtype=torch.bool, device=device)
    for i, k in enumerate(valid_slices):
        valid[i, :k] = True
    with window_statistics(encoder, valid):  # an encoder pretrained with objective.norm_over_window
        emb = slice_embedding(encoder(x.permute(0, 2, 1, 3, 4).reshape(w * n, c, h, wd))).view(w, n, -1)
    per_slice, z = slice_transformer(emb, valid)
    return per_slice.float().cpu(), z.float().cpu()


def embed_volumes(model: nn.Module, windows: np.ndarray, valid_slices: Sequence[int]) -> np.ndarray:
    """Z = normalize(mean_n f_inter(g(f_intra(x_n)))) of each window (W, C, N, H, W') -> (W, d), for a
    :class:`~nnssl_joint.pretrain.model.JointSSLModel` (or anything with the same three parts)."""
    _, z = embed_windows(model.encoder, model.slice_embedding, model.slice_transformer, windows, valid_slices)
    return z.numpy()
