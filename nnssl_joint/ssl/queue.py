"""FIFO feature queue that enlarges the batch seen by Sinkhorn (SwAV, Caron et al. 2020, Sec. 4.2).

With small batches (volumes!) the equal-partition constraint over B samples is too strong; SwAV
stores the embeddings of recent batches and computes codes over queue + batch, keeping only the
batch rows. The queue stores embeddings, not scores, so scores are recomputed with the current
prototypes.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class FeatureQueue(nn.Module):
    """Ring buffer of the last ``length`` embeddings of dimension ``dim``; with ``labelled`` also one int64
    label per row (e.g. the case a volume feature came from), written and returned in the same order.

    Contents, labels, write position and fill count are buffers, so the queue is saved in ``state_dict``
    and a resumed run continues bit-exactly.
    """

    features: Tensor
    pointer: Tensor
    count: Tensor

    def __init__(self, length: int, dim: int, labelled: bool = False) -> None:
        super().__init__()
        if length < 1 or dim < 1:
            raise ValueError(f"FeatureQueue needs length >= 1 and dim >= 1, got {length} and {dim}.")
        self.length = length
        self.dim = dim
        self.labelled = labelled
        self.register_buffer("features", torch.zeros(length, dim))
        if labelled:  # only then: unlabelled queues keep their state_dict keys
            self.register_buffer("labels", torch.full((length,), -1, dtype=torch.long))
        self.register_buffer("pointer", torch.zeros((), dtype=torch.long))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))

    @property
    def is_full(self) -> bool:
        return int(self.count) == self.length

    def __len__(self) -> int:
        return int(self.count)

    @torch.no_grad()
    def push(self, z: Tensor, labels: Tensor | None = None) -> None:
        """Append the rows of ``z`` (B, D), detached (and their ``labels`` (B,) for a labelled queue); the
        oldest rows are overwritten when full."""
        if z.dim() != 2 or z.shape[1] != self.dim:
            raise ValueError(f"FeatureQueue expects (batch, {self.dim}) embeddings, got {tuple(z.shape)}.")
        if self.labelled != (labels is not None) or (labels is not None and labels.shape != z.shape[:1]):
            raise ValueError(f"a {'labelled' if self.labelled else 'unlabelled'} FeatureQueue needs "
                             f"{'one label per row' if self.labelled else 'no labels'}, got "
                             f"{None if labels is None else tuple(labels.shape)} for {z.shape[0]} rows.")
        z = z.detach().to(self.features.dtype)[-self.length :]
        start = int(self.pointer)
        positions = (torch.arange(z.shape[0], device=self.features.device) + start) % self.length
        self.features[positions] = z.to(self.features.device)
        if labels is not None:
            self.labels[positions] = labels[-self.length :].to(self.labels)
        self.pointer.fill_((start + z.shape[0]) % self.length)
        self.count.fill_(min(self.length, int(self.count) + z.shape[0]))

    def _in_order(self, stored: Tensor) -> Tensor:
        count = int(self.count)
        if count < self.length:
            return stored[:count].clone()
        return torch.roll(stored, shifts=-int(self.pointer), dims=0)

    def get(self) -> Tensor:
        """The stored embeddings (count, D) from oldest to newest (a copy)."""
        return self._in_order(self.features)

    def get_labels(self) -> Tensor:
        """The labels (count,) of a labelled queue, in the order of :meth:`get`."""
        if not self.labelled:
            raise ValueError("this FeatureQueue holds no labels (build it with labelled=True).")
        return self._in_order(self.labels)

    @torch.no_grad()
    def clear(self) -> None:
        """Forget all stored embeddings."""
        self.features.zero_()
        if self.labelled:
            self.labels.fill_(-1)
        self.pointer.zero_()
        self.count.zero_()

    def extra_repr(self) -> str:
        return f"length={self.length}, dim={self.dim}" + (", labelled" if self.labelled else "")
