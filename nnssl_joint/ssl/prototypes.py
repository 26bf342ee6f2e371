"""Learnable prototypes C for swapped-prediction clustering (SwAV, Caron et al. 2020, Sec. 3.1)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class _ZeroGradient(torch.autograd.Function):
    """Identity whose backward returns zeros: the input still receives a (zero) gradient.

    Used instead of ``detach`` while prototypes are frozen so that DistributedDataParallel without
    ``find_unused_parameters`` still sees a gradient for every parameter.
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, tensor: Tensor) -> Tensor:
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_output: Tensor) -> Tensor:
        return torch.zeros_like(grad_output)


class Prototypes(nn.Module):
    """K prototype vectors of dimension D stored as rows of ``weight`` (K, D).

    SwAV keeps prototypes on the unit sphere by re-normalising them in place once per step before
    the forward pass (:meth:`normalize_`); gradients act on the raw weight in between.
    """

    def __init__(self, dim: int, num_prototypes: int) -> None:
        super().__init__()
        if dim < 1 or num_prototypes < 1:
            raise ValueError(
                f"Prototypes need dim >= 1 and num_prototypes >= 1, got {dim} and {num_prototypes}."
            )
        self.dim = dim
        self.num_prototypes = num_prototypes
        self.weight = nn.Parameter(F.normalize(torch.randn(num_prototypes, dim), dim=1))

    @torch.no_grad()
    def normalize_(self) -> None:
        """Project every prototype back onto the unit sphere, in place."""
        self.weight.copy_(F.normalize(self.weight, dim=1))

    def forward(self, z: Tensor, frozen: bool = False) -> Tensor:
        """Scores ``z @ C^T`` of shape (B, K) for L2-normalised embeddings ``z`` (B, D).

        ``frozen=True`` gives the prototypes a zero gradient (the embeddings keep theirs).
        """
        if z.shape[-1] != self.dim:
            raise ValueError(f"Prototypes expect embeddings of dimension {self.dim}, got {z.shape[-1]}.")
        weight = _ZeroGradient.apply(self.weight) if frozen else self.weight
        return F.linear(z, weight.to(z.dtype))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_prototypes={self.num_prototypes}"


def cancel_prototype_gradients(module: nn.Module, iteration: int, freeze_iterations: int) -> bool:
    """Drop the gradients of every :class:`Prototypes` inside ``module`` while frozen (SwAV).

    Call after ``backward()`` and before ``optimizer.step()``. Setting ``grad = None`` (instead of
    zero) makes optimizers skip the prototypes entirely, including weight decay and momentum,
    exactly as the SwAV reference does during its first ``freeze_prototypes_niters`` iterations.

    Returns:
        True if gradients were cancelled at this iteration.
    """
    if iteration >= freeze_iterations:
        return False
    for submodule in module.modules():
        if isinstance(submodule, Prototypes):
            submodule.weight.grad = None
    return True
