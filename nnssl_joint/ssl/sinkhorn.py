"""Sinkhorn-Knopp equal-partition codes (SwAV, Caron et al. 2020, Sec. 3.1 and Eq. 3).

The codes Q solve the entropy-regularised transport problem

    max_Q  Tr(Q^T C^T Z) + epsilon * H(Q)   s.t.  every prototype receives mass 1/K,
                                                  every sample carries mass 1/B,

whose solution is ``diag(u) exp(scores / epsilon) diag(v)``; u and v are found by alternately
normalising over samples (per prototype) and over prototypes (per sample). We iterate in the log
domain, so tiny epsilon or large scores cannot overflow or underflow ``exp``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from nnssl_joint.ssl.distributed import all_reduce_, use_distributed


def _logsumexp_over_samples(log_q: Tensor, distributed: bool) -> Tensor:
    """Per-prototype log of the column sums of exp(log_q) over the (global) batch."""
    if log_q.shape[0] > 0:
        column_max = log_q.amax(dim=0)
    else:
        column_max = torch.full((log_q.shape[1],), float("-inf"), dtype=log_q.dtype, device=log_q.device)
    # The shift must be the same on every rank, hence the MAX all-reduce before summing.
    all_reduce_(column_max, "max", distributed)
    shifted_sum = torch.exp(log_q - column_max).sum(dim=0)
    all_reduce_(shifted_sum, "sum", distributed)
    return column_max + torch.log(shifted_sum)


@torch.no_grad()
def sinkhorn(
    scores: Tensor,
    epsilon: float = 0.05,
    iterations: int = 3,
    distributed: bool | None = None,
) -> Tensor:
    """Equal-partition soft codes for a (B, K) score matrix (SwAV Eq. 3, Sinkhorn-Knopp).

    Args:
        scores: (B, K) similarities between B samples and K prototypes (``z @ C^T``).
        epsilon: entropy regularisation; smaller gives sharper codes (SwAV default 0.05).
        iterations: Sinkhorn-Knopp iterations, each one prototype and one sample normalisation.
        distributed: ``None`` = auto (torch.distributed initialised with world size > 1). When on,
            the per-prototype sums run over the batches of all ranks, so every rank returns its
            rows of the single-process result on the concatenated batch. All ranks must call it.

    Returns:
        (B, K) codes whose rows sum to 1; column sums tend to B_total / K as ``iterations`` grows.
        Computed and returned in float32 (float64 input stays float64); never carries gradient.
    """
    if scores.dim() != 2:
        raise ValueError(f"sinkhorn expects a (batch, prototypes) matrix, got shape {tuple(scores.shape)}.")
    if epsilon <= 0:
        raise ValueError(f"sinkhorn epsilon must be > 0 (SwAV uses 0.05), got {epsilon}.")
    if iterations < 1:
        raise ValueError(f"sinkhorn needs at least 1 iteration (SwAV uses 3), got {iterations}.")
    distributed = use_distributed(distributed)
    if scores.shape[0] == 0 and not distributed:
        raise ValueError("sinkhorn got an empty batch; pass at least one sample.")

    dtype = torch.float64 if scores.dtype == torch.float64 else torch.float32
    log_q = scores.detach().to(dtype) / epsilon
    for _ in range(iterations):
        # Each prototype gets mass 1/K, then each sample mass 1/B. The constant factors 1/K and
        # 1/B cancel in the final per-sample normalisation, so they are left out.
        log_q = log_q - _logsumexp_over_samples(log_q, distributed)
        log_q = log_q - torch.logsumexp(log_q, dim=1, keepdim=True)
    return torch.exp(log_q)
