"""Masked slice-embedding prediction (L_mask of Nguyen et al., AAAI 2023).

A ratio of the valid slices of each volume (at least one) is replaced by a learned mask token before
f_inter; a linear decoder on f_inter's per-slice output predicts the original (detached) embeddings.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def sample_slice_mask(valid: Tensor, ratio: float = 0.1, generator: torch.Generator | None = None) -> Tensor:
    """(B, N) bool mask selecting round(ratio * n_valid) valid slices per sample, at least one.

    Rounding is half-up. Padded slices are never selected; a sample without valid slices gets none.
    ``generator`` must live on ``valid.device``.
    """
    _check_valid(valid)
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"mask ratio must lie in [0, 1], got {ratio}")
    n_valid = valid.sum(dim=1)
    n_mask = torch.floor(n_valid.double() * ratio + 0.5).long().clamp_min(1).minimum(n_valid)
    return _random_valid(valid, n_mask, generator)


def _check_valid(valid: Tensor) -> None:
    if valid.dim() != 2 or valid.dtype != torch.bool:
        raise ValueError(f"valid must be a (B, N) bool tensor, got {valid.dtype} {tuple(valid.shape)}")


def _random_valid(valid: Tensor, counts: Tensor | int, generator: torch.Generator | None) -> Tensor:
    """``counts`` (per row, or one for all) valid slices of each row of ``valid`` at random."""
    scores = torch.rand(valid.shape, generator=generator, device=valid.device)
    scores = scores.masked_fill(~valid, 2.0)  # padded slices sort last
    rank = scores.argsort(dim=1).argsort(dim=1)
    counts = counts[:, None] if isinstance(counts, Tensor) else counts
    return (rank < counts) & valid


def sample_valid_slices(valid: Tensor, count: int, generator: torch.Generator | None = None) -> Tensor:
    """(B, N) bool selecting ``count`` valid slices per sample at random (all of them where a sample has
    fewer); padded slices are never selected. ``generator`` must live on ``valid.device``."""
    _check_valid(valid)
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    return _random_valid(valid, count, generator)


def sample_sub_window_starts(valid: Tensor, shift: int, n_views: int,
                             generator: torch.Generator | None = None) -> Tensor:
    """(B, n_views) int64 starts of sub-windows of ``N - shift`` consecutive positions of (B, N) windows.

    Each start is uniform over 0..``shift``, independently per window and view, restricted to the starts
    whose sub-window holds at least one valid position (a short volume is centred in its padded window);
    ``shift`` must lie in [0, N). ``generator`` must live on ``valid.device``."""
    _check_valid(valid)
    n = valid.shape[1]
    if not 0 <= shift < n:
        raise ValueError(f"shift must lie in [0, {n}) for windows of {n} slices, got {shift}")
    if not valid.any(dim=1).all():
        raise ValueError("every window needs a valid slice to place a sub-window on")
    length = n - shift
    positions = torch.arange(n, device=valid.device)
    first = torch.where(valid, positions, n).amin(dim=1)
    last = torch.where(valid, positions, -1).amax(dim=1)
    low = (first - length + 1).clamp_min(0)[:, None]
    high = last.clamp_max(shift)[:, None]
    u = torch.rand((valid.shape[0], n_views), generator=generator, device=valid.device)
    return (low + (u * (high - low + 1)).long().clamp_max(high - low)).long()


def take_sub_windows(x: Tensor, starts: Tensor, length: int) -> Tensor:
    """The ``length`` positions from ``starts[b]`` on of each row b of ``x`` (B, N, ...): (B, length, ...)."""
    if starts.shape != x.shape[:1]:
        raise ValueError(f"starts must be ({x.shape[0]},), got {tuple(starts.shape)}")
    index = starts[:, None] + torch.arange(length, device=x.device)
    if length < 1 or index.min() < 0 or index.max() >= x.shape[1]:
        raise ValueError(f"sub-windows of {length} positions from starts {starts.tolist()} do not fit in "
                         f"{x.shape[1]} positions")
    return x[torch.arange(x.shape[0], device=x.device)[:, None], index]


class MaskedSliceModeling(nn.Module):
    """Learned mask token (dim,) and the linear decoder from f_inter outputs to slice embeddings."""

    def __init__(self, dim: int, mask_token_std: float = 0.02) -> None:
        super().__init__()
        self.mask_token = nn.Parameter(torch.randn(dim) * mask_token_std)
        self.decoder = nn.Linear(dim, dim)

    def apply_mask(self, tokens: Tensor, mask: Tensor) -> Tensor:
        """Replace tokens (B, N, dim) at mask (B, N) == True by the mask token."""
        if mask.shape != tokens.shape[:2] or mask.dtype != torch.bool:
            raise ValueError(f"mask must be bool of shape {tuple(tokens.shape[:2])}, got {mask.dtype} "
                             f"{tuple(mask.shape)}")
        return torch.where(mask[..., None], self.mask_token.to(tokens.dtype), tokens)

    def forward(self, per_slice: Tensor) -> Tensor:
        """Decode f_inter's per-slice outputs (B, N, dim) into predicted slice embeddings."""
        return self.decoder(per_slice)


def masked_embedding_loss(prediction: Tensor, target: Tensor, mask: Tensor, valid: Tensor | None = None,
                          all_positions: bool = False) -> Tensor:
    """Mean squared error between predicted and (detached) target embeddings, both (B, N, dim).

    Default (BERT): averaged over masked valid positions and the feature dimension.
    ``all_positions=True``: the released code's variant, averaged over every valid position.
    Positions outside the selection get exactly zero gradient; the loss is 0 if none is selected.
    """
    if prediction.shape != target.shape or prediction.dim() != 3:
        raise ValueError(f"prediction and target must both be (B, N, dim), got {tuple(prediction.shape)} "
                         f"and {tuple(target.shape)}")
    selected = torch.ones_like(mask) if all_positions else mask
    if valid is not None:
        selected = selected & valid
    squared = (prediction - target.detach()).pow(2)
    squared = torch.where(selected[..., None], squared, torch.zeros_like(squared))
    count = selected.sum() * prediction.shape[-1]
    return squared.sum() / count.clamp_min(1)


@torch.no_grad()
def standardize_targets(embeddings: Tensor, valid: Tensor | None = None, eps: float = 1e-5) -> Tensor:
    """Per-feature standardisation of (B, N, dim) slice embeddings with the mean / std over the valid slices
    of the (global) batch, detached: the normalised targets of L_mask (like MAE's normalised pixels).

    Raw targets let L_mask fall by shrinking the embeddings or by predicting the component every slice
    shares; standardised, predicting the batch mean scores 1.0 per feature and only information about the
    masked slice lowers the loss. Under torch.distributed the statistics run over all ranks."""
    import torch.distributed as dist

    x = embeddings.detach().float()
    sel = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device) if valid is None else valid
    flat = x[sel]
    d = x.shape[-1]
    stats = torch.cat([flat.sum(0), (flat * flat).sum(0), flat.new_tensor([flat.shape[0]])])
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(stats)
    count = stats[-1].clamp_min(1)
    mean = stats[:d] / count
    var = (stats[d:2 * d] / count - mean * mean).clamp_min(0)
    return ((x - mean) / torch.sqrt(var + eps)).to(embeddings.dtype)
