"""Slice embedding g and the clustering projection head (Nguyen et al., AAAI 2023).

g pools every stage of the 2D encoder f_intra globally, L2-normalises each pooled vector (so no stage
dominates by scale), concatenates them into a multi-level descriptor and maps it linearly to d. The
same g feeds the 2D clustering loss (through :class:`ProjectionHead`) and the slice tokens of f_inter.

Pooling is global *max* pooling by default (preset key ``slice_pooling``: ``max``, ``avg`` or ``avgmax``).
nnU-Net's encoders use InstanceNorm, which sets each channel's spatial mean to its affine bias for every
input: average-pooled descriptors then differ between slices only through the LeakyReLU's asymmetry.
Measured on the demo data at initialisation, 1 - mean pairwise cosine of the pooled stages was 5e-4 to
6e-3 with the average and 1e-2 to 4e-2 with the maximum; after 400 pretraining iterations the slices of
all volumes fell into 1 of 34 2D prototypes with average pooling and into 18 with max pooling.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def encoder_stage_channels(encoder: nn.Module) -> list[int]:
    """Channels per stage of a dynamic_network_architectures encoder (``PlainConvEncoder``,
    ``ResidualEncoder``) or of a network that holds one as ``.encoder`` (e.g. ``PlainConvUNet``)."""
    source = encoder if hasattr(encoder, "output_channels") else getattr(encoder, "encoder", None)
    channels = getattr(source, "output_channels", None)
    if channels is None:
        raise ValueError(f"{type(encoder).__name__} has no `output_channels` (nor an `.encoder` with one); "
                         "pass the stage channels to SliceEmbeddingHead explicitly")
    if isinstance(channels, int):
        raise TypeError(f"{type(encoder).__name__}.output_channels is a single int ({channels}); "
                         "expected one entry per stage")
    return [int(c) for c in channels]


#: global pooling of each stage: average, maximum, or both concatenated
POOLINGS = ("avg", "max", "avgmax")


class SliceEmbeddingHead(nn.Module):
    """Multi-level slice descriptor: global pooling per stage -> L2-normalise -> concat -> Linear."""

    def __init__(self, stage_channels: Sequence[int], dim: int, pooling: str = "max") -> None:
        super().__init__()
        if len(stage_channels) == 0 or any(c < 1 for c in stage_channels) or dim < 1:
            raise ValueError(f"need >= 1 stage with positive channels and dim >= 1, "
                             f"got {list(stage_channels)}, {dim}")
        if pooling not in POOLINGS:
            raise ValueError(f"slice pooling must be one of {POOLINGS}, got {pooling!r}")
        self.stage_channels = [int(c) for c in stage_channels]
        self.dim = dim
        self.pooling = pooling
        width = 2 if pooling == "avgmax" else 1
        self.proj = nn.Linear(width * sum(self.stage_channels), dim)

    def forward(self, skips: Sequence[Tensor]) -> Tensor:
        """skips: one feature map (B, C_s, *spatial) per stage, as returned by an encoder with
        ``return_skips=True`` -> (B, dim)."""
        if len(skips) != len(self.stage_channels):
            raise ValueError(f"expected {len(self.stage_channels)} stage outputs, got {len(skips)}; "
                             "build the encoder with return_skips=True")
        pooled = []
        for s, (features, channels) in enumerate(zip(skips, self.stage_channels)):
            if features.dim() < 3 or features.shape[1] != channels:
                raise ValueError(f"stage {s}: expected (B, {channels}, ...), got {tuple(features.shape)}")
            flat = features.flatten(2)
            if self.pooling in ("avg", "avgmax"):
                pooled.append(F.normalize(flat.mean(dim=-1), dim=-1))
            if self.pooling in ("max", "avgmax"):
                pooled.append(F.normalize(flat.amax(dim=-1), dim=-1))
        return self.proj(torch.cat(pooled, dim=-1))


class GlobalBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d whose training statistics cover the global batch under torch.distributed.

    Like ``nn.SyncBatchNorm`` but for any backend (gloo on CPU too), using the differentiable
    all-reduce of ``torch.distributed.nn``: N processes normalise exactly as one process on the
    concatenated batch. Without an initialised process group it is a plain BatchNorm1d.
    """

    def forward(self, x: Tensor) -> Tensor:
        import torch.distributed as dist

        if not (self.training and dist.is_available() and dist.is_initialized()
                and dist.get_world_size() > 1):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        stats = torch.cat([x.sum(0), (x * x).sum(0), x.new_tensor([x.shape[0]])])
        stats = all_reduce(stats)
        c = x.shape[1]
        count = stats[-1]
        mean = stats[:c] / count
        var = stats[c:2 * c] / count - mean * mean
        with torch.no_grad():
            self.num_batches_tracked += 1
            unbiased = var * count / (count - 1).clamp_min(1)
            self.running_mean.mul_(1 - self.momentum).add_(self.momentum * mean.detach())
            self.running_var.mul_(1 - self.momentum).add_(self.momentum * unbiased.detach())
        out = (x - mean) / torch.sqrt(var + self.eps)
        return out * self.weight + self.bias if self.affine else out


class RunningBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d that normalises with its running statistics in training too (no gradient through them).

    Made for tiny batches (the volume batch holds 2-4 windows): the statistics of the current (global)
    batch only update the running mean and variance, which average over the last ~1/momentum batches, so
    two windows are not mapped to +-1 as plain BatchNorm would. Like BatchNorm it removes the component
    all samples share (the volume features of an InstanceNorm encoder are dominated by one). The first
    batches use a cumulative average (momentum max(momentum, 1 / batches seen)). Under torch.distributed
    the batch statistics are summed over all ranks first, so every rank holds the same running statistics
    and N processes compute what one process computes on the concatenated batch.
    """

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 2:
            raise ValueError(f"RunningBatchNorm1d expects (batch, features), got {tuple(x.shape)}")
        if self.training:
            import torch.distributed as dist

            with torch.no_grad():
                xf = x.detach().float()
                stats = torch.cat([xf.sum(0), (xf * xf).sum(0), xf.new_tensor([x.shape[0]])])
                if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                    dist.all_reduce(stats)
                c = x.shape[1]
                count = stats[-1].clamp_min(1)
                mean = stats[:c] / count
                var = (stats[c:2 * c] / count - mean * mean).clamp_min(0)
                self.num_batches_tracked += 1
                momentum = max(float(self.momentum), 1.0 / float(self.num_batches_tracked))
                self.running_mean.mul_(1 - momentum).add_(momentum * mean.to(self.running_mean.dtype))
                self.running_var.mul_(1 - momentum).add_(momentum * var.to(self.running_var.dtype))
        out = (x - self.running_mean.to(x.dtype)) / torch.sqrt(self.running_var.to(x.dtype) + self.eps)
        return out * self.weight + self.bias if self.affine else out


class ProjectionHead(nn.Module):
    """SwAV-style projection MLP Linear -> norm -> ReLU -> Linear with L2-normalised output.

    ``norm="batch"`` (BatchNorm1d, as in SwAV) needs more than one sample in training; ``"layer"``
    (LayerNorm) works for any batch; ``"running_batch"`` (:class:`RunningBatchNorm1d`) centres and scales
    across samples with running statistics, for tiny batches. Leading dimensions beyond the last are flattened
    and restored.
    """

    def __init__(self, dim: int, hidden: int, out_dim: int, norm: str = "batch") -> None:
        super().__init__()
        norms = {"batch": GlobalBatchNorm1d, "layer": nn.LayerNorm, "running_batch": RunningBatchNorm1d}
        if norm not in norms:
            raise ValueError(f"norm must be one of {sorted(norms)}, got {norm!r}")
        self.net = nn.Sequential(nn.Linear(dim, hidden), norms[norm](hidden), nn.ReLU(inplace=True),
                                 nn.Linear(hidden, out_dim))

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        out = self.net(x.reshape(-1, shape[-1]))
        return F.normalize(out, dim=-1).reshape(*shape[:-1], -1)
