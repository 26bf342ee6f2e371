"""Variance-covariance regulariser on the representations themselves (the variance and covariance terms of
VICReg, Bardes, Ponce and LeCun, ICLR 2022), an addition to the AAAI 2023 objective (term ``varcov``).

Over the rows of a batch (B, D):

    v = mean_j max(0, target_std - sqrt(Var_j + eps))          every feature must vary across samples
    c = sum_{i != j} Cov_ij^2 / D                               features must not repeat each other
    loss = v + covariance_weight * c                            (VICReg: weights 25 and 1, so 0.04)

Why here: the clustering losses act on normalised projections behind BatchNorm / LayerNorm heads, which can
look healthy while the slice embeddings e and the volume feature beneath them lose their effective rank
(docs/pretraining.md, ablation). This term acts on e and on the un-normalised pooled f_inter output directly
(``nnssl_joint.models.slice_transformer.masked_slice_mean``, the pooling behind Z).
Under torch.distributed the statistics run over the global batch (differentiable all-reduce), so N processes
compute the loss and, after DDP's gradient averaging, the gradients of one process on the whole batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from nnssl_joint.ssl.distributed import use_distributed


def _all_reduce_sum(tensor: Tensor, distributed: bool) -> Tensor:
    if not distributed:
        return tensor
    from torch.distributed.nn.functional import all_reduce

    return all_reduce(tensor)


def variance_covariance_loss(x: Tensor, target_std: float = 1.0, covariance_weight: float = 0.04,
                             eps: float = 1e-4, distributed: bool | None = None) -> Tensor:
    """VICReg's variance + weighted covariance term of ``x`` (B, D) over its rows (global batch under DDP).

    Statistics are computed in float32 in two passes (mean first, then centred products), which stays exact
    when the rows share a large common component, as collapsed embeddings do. Needs at least 2 rows (in a
    single process; under DDP a global batch of one row gives the biased estimate, without a host sync).
    """
    if x.dim() != 2:
        raise ValueError(f"variance_covariance_loss expects (batch, features), got shape {tuple(x.shape)}")
    if target_std <= 0 or covariance_weight < 0 or eps <= 0:
        raise ValueError(f"need target_std > 0, covariance_weight >= 0 and eps > 0, got {target_std}, "
                         f"{covariance_weight}, {eps}")
    distributed = use_distributed(distributed)
    if not distributed and x.shape[0] < 2:
        raise ValueError(f"variance_covariance_loss needs at least 2 rows, got {x.shape[0]}")
    x = x.float()
    d = x.shape[1]
    stats = _all_reduce_sum(torch.cat([x.sum(0), x.new_tensor([x.shape[0]])]), distributed)
    count = stats[d].detach()
    centred = x - stats[:d] / count
    cov = _all_reduce_sum(centred.T @ centred, distributed) / (count - 1).clamp_min(1)
    var = torch.diagonal(cov)
    variance = F.relu(target_std - torch.sqrt(var + eps)).mean()
    off_diagonal = cov - torch.diag_embed(var)
    covariance = off_diagonal.pow(2).sum() / d
    return variance + covariance_weight * covariance

