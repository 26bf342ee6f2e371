"""Instance normalisation over several slices of one volume, for the slice-wise 2D encoder.

The encoder f_intra is a 2D network: a volume (or a pretraining window) enters it as a batch of slices, and
a plain ``nn.InstanceNorm2d`` normalises every slice by its own mean and variance. Stock nnU-Net's 3D
networks normalise over the whole patch instead. :class:`VolumeInstanceNorm2d` is an InstanceNorm2d (same
parameter names and shapes, so weights load unchanged either way) that can take its statistics over groups
of consecutive batch rows:

- ``slices`` = Z: every Z consecutive rows are one volume (:class:`~nnssl_joint.models.downstream.
  SliceWiseUNet3D` with ``norm_over_volume``, where every slice of a patch is real).
- ``windows`` = (leading rows, valid (W, N)): the first rows are 2D items with their own statistics, the
  rest are W windows of N slices each, normalised over their valid slices; padding slices keep per-slice
  statistics and do not enter their window's (pretraining with ``objective.norm_over_window``, set for one
  forward by :func:`window_statistics`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.nn import functional as F


class VolumeInstanceNorm2d(nn.InstanceNorm2d):
    """The encoder's InstanceNorm2d, with its statistics taken over all slices of one volume.

    The slice-wise encoder runs on (B*Z, C, Y, X); a plain InstanceNorm2d normalises every slice by its
    own mean and variance (Y*X values per channel), so a slice's features lose how bright and how varied it
    is relative to its neighbours, and slices with little content are stretched to unit variance. Stock
    nnU-Net's InstanceNorm3d normalises over the whole Z*Y*X patch. With ``slices`` = Z this module groups
    the Z consecutive slices of each volume and normalises them together, as InstanceNorm3d does, with the
    same affine weight and bias (parameter names and shapes are InstanceNorm2d's, so pretrained weights
    load unchanged). ``slices`` = 1 is exactly InstanceNorm2d. The owning network sets ``slices`` before
    every forward (:meth:`SliceWiseUNet3D.forward`). ``windows`` (set by :func:`window_statistics`, takes
    precedence over ``slices``) normalises pretraining windows with padding slices: see the module docstring.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = False) -> None:
        if track_running_stats:
            raise ValueError("VolumeInstanceNorm2d does not track running statistics (nnU-Net's InstanceNorm "
                             "does not either)")
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine)
        #: consecutive batch entries (slices of one volume) that share statistics
        self.slices = 1
        #: (rows with their own statistics, valid slices (W, N) of the windows after them), or None
        self.windows: tuple[int, Tensor] | None = None

    def forward(self, x: Tensor) -> Tensor:
        if self.windows is not None:
            return self._window_forward(x, *self.windows)
        if self.slices == 1:
            return super().forward(x)
        n = x.shape[0]
        if n % self.slices:
            raise ValueError(f"VolumeInstanceNorm2d: {n} slices are not a whole number of volumes of "
                             f"{self.slices} slices")
        volumes = x.unflatten(0, (n // self.slices, self.slices)).transpose(1, 2)  # (B, C, Z, Y, X)
        out = F.instance_norm(volumes, weight=self.weight, bias=self.bias, eps=self.eps)
        return out.transpose(1, 2).flatten(0, 1)

    def _window_forward(self, x: Tensor, leading: int, valid: Tensor) -> Tensor:
        """Per-row statistics (one pass over ``x``), pooled per window with the exact formula for equal-sized
        parts (the mean of the row means; the mean of row variance + squared deviation of the row mean), then
        one affine pass: no copy of the activations, as fast as the per-slice norm."""
        w, n = valid.shape
        if x.shape[0] != leading + w * n:
            raise ValueError(f"VolumeInstanceNorm2d: {x.shape[0]} rows, but the windows set for this forward "
                             f"need {leading} leading rows + {w} windows x {n} slices = {leading + w * n}")
        stats_input = x if x.dtype == torch.float64 else x.float()  # statistics in float32 under autocast
        var, mean = torch.var_mean(stats_input, dim=(2, 3), correction=0)  # (M, C) per row
        if w:
            keep = valid.to(device=x.device, dtype=torch.bool)[:, :, None]  # (W, N, 1)
            weight = keep.to(mean.dtype)
            count = weight.sum(1, keepdim=True).clamp_min(1.0)  # (W, 1, 1)
            row_mean, row_var = mean[leading:].unflatten(0, (w, n)), var[leading:].unflatten(0, (w, n))
            window_mean = (row_mean * weight).sum(1, keepdim=True) / count  # (W, 1, C)
            window_var = ((row_var + (row_mean - window_mean).square()) * weight).sum(1, keepdim=True) / count
            # padding slices keep their own statistics and do not enter their window's
            pooled_mean = torch.where(keep, window_mean, row_mean).flatten(0, 1)
            pooled_var = torch.where(keep, window_var, row_var).flatten(0, 1)
            mean = torch.cat([mean[:leading], pooled_mean]) if leading else pooled_mean
            var = torch.cat([var[:leading], pooled_var]) if leading else pooled_var
        scale = torch.rsqrt(var + self.eps)
        shift = -mean * scale
        if self.affine:
            scale = scale * self.weight
            shift = shift * self.weight + self.bias
        return torch.addcmul(shift[:, :, None, None].to(x.dtype), x, scale[:, :, None, None].to(x.dtype))


def _swap_instance_norms(encoder: nn.Module) -> list[tuple[nn.Module, str, nn.Module, VolumeInstanceNorm2d]]:
    """Replace every ``nn.InstanceNorm2d`` inside ``encoder`` by a :class:`VolumeInstanceNorm2d` holding the
    same parameters (a module registered under two names, as dynamic_network_architectures' conv blocks
    register their norm as ``norm`` and in ``all_modules``, stays one module). Returns (parent, name, old
    module, new module) per registration, so that a caller can put the old modules back."""
    replaced: dict[int, VolumeInstanceNorm2d] = {}
    swaps: list[tuple[nn.Module, str, nn.Module, VolumeInstanceNorm2d]] = []
    for parent in list(encoder.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not nn.InstanceNorm2d:
                continue
            if id(child) not in replaced:
                new = VolumeInstanceNorm2d(child.num_features, eps=child.eps, momentum=child.momentum,
                                           affine=child.affine)
                if child.affine:
                    new.weight, new.bias = child.weight, child.bias
                replaced[id(child)] = new
            setattr(parent, name, replaced[id(child)])
            swaps.append((parent, name, child, replaced[id(child)]))
    return swaps


def use_volume_statistics(encoder: nn.Module) -> list[VolumeInstanceNorm2d]:
    """Replace every ``nn.InstanceNorm2d`` inside ``encoder`` by a :class:`VolumeInstanceNorm2d` holding the
    same parameters (:func:`_swap_instance_norms`), for good. Returns the new modules."""
    return list(dict.fromkeys(new for _, _, _, new in _swap_instance_norms(encoder)))


@contextmanager
def grouped_statistics(encoder: nn.Module, slices: int) -> Iterator[None]:
    """Within the block, every InstanceNorm of ``encoder`` takes its statistics over each ``slices``
    consecutive batch rows (one volume's slices), as :class:`SliceWiseUNet3D` with ``norm_over_volume`` runs
    it. Plain ``nn.InstanceNorm2d`` modules are swapped for :class:`VolumeInstanceNorm2d` sharing their
    parameters (:func:`_swap_instance_norms`) and put back afterwards; every norm's ``slices`` is restored, so
    the encoder leaves the block as it entered it (a training model's structure and state_dict keys are
    untouched)."""
    swaps = _swap_instance_norms(encoder)
    norms = [m for m in encoder.modules() if isinstance(m, VolumeInstanceNorm2d)]
    before = [norm.slices for norm in norms]
    try:
        for norm in norms:
            norm.slices = slices
        yield
    finally:
        for norm, value in zip(norms, before):
            norm.slices = value
        for parent, name, old, _ in swaps:
            setattr(parent, name, old)


@contextmanager
def window_statistics(encoder: nn.Module, valid: Tensor, leading_rows: int = 0) -> Iterator[None]:
    """Within the block, every :class:`VolumeInstanceNorm2d` of ``encoder`` takes the statistics of the
    window each row belongs to: the batch is ``leading_rows`` 2D items (own statistics), then the slices of
    ``valid.shape[0]`` windows, window by window (``valid`` (W, N): which slices are real). An encoder
    without such modules (per-slice statistics) is left as it is."""
    norms = [m for m in encoder.modules() if isinstance(m, VolumeInstanceNorm2d)]
    for norm in norms:
        norm.windows = (leading_rows, valid)
    try:
        yield
    finally:
        for norm in norms:
            norm.windows = None
