"""Dense contrastive term between two views, with pixel correspondence from tracked coordinates (ours).

Not in Nguyen et al. (AAAI 2023); the clustering objectives there act on pooled descriptors only, and a
frozen-encoder dense probe moved by 4-6 Dice points whichever of them trained the encoder
(docs/pretraining.md). This term acts on one skip level of f_intra directly.

Each view carries, per pixel, the continuous (y, x) position in the sample it was cut from and an in-image
weight (the view loaders' ``coordinates=True``; :func:`nnssl_joint.data.augment.coordinate_maps`). On the
feature grid of the chosen skip (stride k), a cell's source position is the mean over its k x k pixels, and
a cell is usable when all of them lie inside the source. For a query cell of view A (a row: one 2D item,
or one slice of a volume window) the positive is the cell of view B of the same row whose source position
is nearest, if it lies within ``radius`` x the cell spacing (in source pixels, the larger of the two
views'); the negatives are every other usable cell of view B over the batch, except cells of the same
source (the same 2D item; any slice of the same window) within ``exclusion`` x the spacing, which show
the same tissue and are left out rather than pushed away. The loss is the InfoNCE cross-entropy at
temperature ``temperature``, both directions (A->B, B->A), averaged over the queries that have a positive.
Queries may be subsampled (``max_queries`` per direction, drawn with torch's generator, so a seeded run
repeats exactly), and so may the negatives (``max_keys``: a random subset of the other view's usable cells;
the positive is always found among all cells of the query's own row, so only the negatives thin out).

Volume windows give the term a correspondence that 2D images cannot: :func:`window_slice_pairs` pairs slice
n of view A with slice n + d of view B (``objective.dense_slice_offset``), the same in-plane position of a
neighbouring slice, so the positive crosses the slice axis as well as the in-plane augmentation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: the in-image weight above which a coordinate is taken as inside the source (bilinear zero padding
#: lowers it at the border)
INSIDE = 0.999


class DenseProjectionHead(nn.Module):
    """1x1 convolution, ReLU, 1x1 convolution: per-cell projection of a skip's features to ``out_dim``."""

    def __init__(self, in_channels: int, hidden_dim: int, out_dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(in_channels, hidden_dim, 1), nn.ReLU(inplace=True),
                                 nn.Conv2d(hidden_dim, out_dim, 1))

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.net(x), dim=1)


def pool_coordinates(coords: Tensor, grid: tuple[int, int]) -> tuple[Tensor, Tensor, Tensor]:
    """(M, 3, h, w) coordinate maps -> per cell of an (hf, wf) grid: positions (M, hf * wf, 2), usable
    (M, hf * wf) bool, and the cell spacing in source pixels per row (M,)."""
    if coords.dim() != 4 or coords.shape[1] != 3:
        raise ValueError(f"coordinate maps must be (M, 3, h, w) = (y, x, in-image weight), got "
                         f"{tuple(coords.shape)}")
    h, w = coords.shape[-2:]
    hf, wf = grid
    if h % hf or w % wf:
        raise ValueError(f"view size {(h, w)} is not a multiple of the feature grid {(hf, wf)}")
    kernel = (h // hf, w // wf)
    coords = coords.float()
    position = F.avg_pool2d(coords[:, :2], kernel)  # (M, 2, hf, wf)
    inside = -F.max_pool2d(-coords[:, 2:3], kernel) > INSIDE  # every pixel of the cell inside
    m = coords.shape[0]
    position = position.flatten(2).transpose(1, 2)  # (M, P, 2)
    inside = inside.flatten(1)
    grid_pos = position.view(m, hf, wf, 2)
    steps = []
    if wf > 1:
        steps.append((grid_pos[:, :, 1:] - grid_pos[:, :, :-1]).norm(dim=-1).flatten(1))
    if hf > 1:
        steps.append((grid_pos[:, 1:] - grid_pos[:, :-1]).norm(dim=-1).flatten(1))
    spacing = (torch.cat(steps, 1).mean(1) if steps
               else torch.full((m,), float(max(kernel)), device=coords.device))
    return position, inside, spacing


def window_slice_pairs(valid: Tensor, max_offset: int) -> tuple[Tensor, Tensor, Tensor]:
    """Rows of the window part of the dense term: ``(window, slice in view A, slice in view B)`` index
    tensors over a (B, N) ``valid`` mask of the windows' slices.

    ``max_offset`` 0: every valid slice with itself. D > 0: each valid slice n with n + d, |d| drawn
    uniformly from 1..D and its sign at random (torch's generator); where n + d leaves the window or hits
    padding the sign flips, and a slice with no valid partner either way is left out.
    """
    if valid.dim() != 2:
        raise ValueError(f"valid must be a (windows, slices) mask, got shape {tuple(valid.shape)}")
    if max_offset < 0:
        raise ValueError(f"max_offset must be >= 0, got {max_offset}")
    valid = valid.to(torch.bool)
    window, slice_a = valid.nonzero(as_tuple=True)
    if max_offset == 0 or window.numel() == 0:
        return window, slice_a, slice_a.clone()
    n = valid.shape[1]
    magnitude = torch.randint(1, max_offset + 1, (window.numel(),)).to(valid.device)
    sign = torch.where(torch.rand(window.numel()) < 0.5, -1, 1).to(valid.device)

    def partner_ok(target: Tensor) -> Tensor:
        inside = (target >= 0) & (target < n)
        return inside & valid[window, target.clamp(0, n - 1)]

    slice_b = slice_a + sign * magnitude
    flipped = slice_a - sign * magnitude
    slice_b = torch.where(partner_ok(slice_b), slice_b, flipped)
    keep = partner_ok(slice_b)
    return window[keep], slice_a[keep], slice_b[keep]


def _one_direction(fq: Tensor, fk: Tensor, pq: Tensor, pk: Tensor, uq: Tensor, uk: Tensor, spacing: Tensor,
                   source: Tensor, temperature: float, radius: float, exclusion: float,
                   max_queries: int | None, max_keys: int | None) -> tuple[Tensor, int]:
    m, p, _ = fq.shape
    rows = torch.arange(m, device=fq.device).repeat_interleave(p)
    q_idx = uq.flatten().nonzero().squeeze(1)
    k_idx = uk.flatten().nonzero().squeeze(1)
    if q_idx.numel() == 0 or k_idx.numel() == 0:
        return fq.sum() * 0.0, 0
    if max_queries is not None and q_idx.numel() > max_queries:
        pick = torch.randperm(q_idx.numel())[:max_queries].to(q_idx.device)
        q_idx = q_idx[pick.sort().values]
    q_rows = rows[q_idx]
    q_pos = pq.reshape(-1, 2)[q_idx]
    # the positive: the nearest usable cell of the query's own row in the other view (Q x P distances)
    row_dist = torch.cdist(q_pos[:, None], pk[q_rows]).squeeze(1).masked_fill(~uk[q_rows], float("inf"))
    nearest = row_dist.min(1)
    scale = spacing[q_rows]
    has_positive = nearest.values <= radius * scale
    if not bool(has_positive.any()):
        return fq.sum() * 0.0, 0
    q_idx, q_rows, q_pos, scale = (t[has_positive] for t in (q_idx, q_rows, q_pos, scale))
    positive = q_rows * p + nearest.indices[has_positive]  # flat cell index in the other view
    # the negatives: every usable cell of the other view, or a random max_keys of them, except cells of the
    # same source within the exclusion radius (same tissue; this also removes the positive itself)
    if max_keys is not None and k_idx.numel() > max_keys:
        pick = torch.randperm(k_idx.numel())[:max_keys].to(k_idx.device)
        k_idx = k_idx[pick.sort().values]
    k_rows = rows[k_idx]
    dist = torch.cdist(q_pos, pk.reshape(-1, 2)[k_idx])  # (Q, K) in source pixels
    excluded = (source[q_rows][:, None] == source[k_rows][None, :]) & (dist < exclusion * scale[:, None])
    flat_q = fq.reshape(-1, fq.shape[-1])[q_idx].float() / temperature  # (Q, D): 1/T on Q rows, not Q x K
    flat_k = fk.reshape(-1, fk.shape[-1])  # cast per gathered row below: no float copy of the whole table
    positive_logit = (flat_q * flat_k[positive].float()).sum(-1)
    # the (Q, K) matrix is written once (the product, masked in place): no copy for the concatenation with
    # the positive, no log-softmax output; cross-entropy with the positive at index 0 is
    # log(exp(pos) + sum exp(neg)) - pos, taken about the row maximum (finite: it includes the positive)
    negative_logits = (flat_q @ flat_k[k_idx].float().T).masked_fill_(excluded, float("-inf"))
    top = torch.maximum(positive_logit, negative_logits.amax(1)).detach()
    total = torch.exp(negative_logits - top[:, None]).sum(1) + torch.exp(positive_logit - top)
    return (top + torch.log(total) - positive_logit).sum(), int(q_idx.numel())


def dense_correspondence_loss(fa: Tensor, fb: Tensor, ca: Tensor, cb: Tensor, source: Tensor,
                              temperature: float = 0.2, radius: float = 0.75, exclusion: float = 2.0,
                              max_queries: int | None = None, max_keys: int | None = None) -> Tensor:
    """See the module docstring. ``fa``, ``fb``: (M, D, hf, wf) L2-normalised (per cell) features of the
    two views of M rows; ``ca``, ``cb``: their (M, 3, h, w) coordinate maps; ``source``: (M,) ids, equal for
    rows cut from the same in-plane source (the slices of one volume window). Returns a scalar (0, still in
    the graph, when no cell has a positive)."""
    if fa.shape != fb.shape or fa.dim() != 4:
        raise ValueError(f"the two views' features must be (M, D, hf, wf) of one shape, got "
                         f"{tuple(fa.shape)} and {tuple(fb.shape)}")
    if ca.shape[0] != fa.shape[0] or cb.shape[0] != fa.shape[0] or source.shape != (fa.shape[0],):
        raise ValueError(f"need one coordinate map and one source id per row ({fa.shape[0]}), got "
                         f"{tuple(ca.shape)}, {tuple(cb.shape)}, {tuple(source.shape)}")
    grid = tuple(fa.shape[-2:])
    pa, ua, sa = pool_coordinates(ca, grid)
    pb, ub, sb = pool_coordinates(cb, grid)
    spacing = torch.maximum(sa, sb)
    fa = fa.flatten(2).transpose(1, 2)
    fb = fb.flatten(2).transpose(1, 2)
    total, count = fa.sum() * 0.0, 0
    for fq, fk, pq, pk, uq, uk in ((fa, fb, pa, pb, ua, ub), (fb, fa, pb, pa, ub, ua)):
        loss, n = _one_direction(fq, fk, pq, pk, uq, uk, spacing, source, temperature, radius, exclusion,
                                 max_queries, max_keys)
        total, count = total + loss, count + n
    return total / max(count, 1)
