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
    if valid.dim() != 2 or valid.dtype != torch.bool:
        raise ValueError(f"valid must be a (B, N) bool tensor, got {valid.dtype} {tuple(valid.shape)}")
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"mask ratio must lie in [0, 1], got {ratio}")
    n_valid = valid.sum(dim=1)
    n_mask = torch.floor(n_valid.double() * ratio + 0.5).long().clamp_min(1).minimum(n_valid)
    scores = torch.rand(valid.shape, generator=generator, device=valid.device)
    scores = scores.masked_fill(~valid, 2.0)  # padded slices sort last
    rank = scores.argsort(dim=1).argsort(dim=1)
    return (rank < n_mask[:, None]) & valid


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
