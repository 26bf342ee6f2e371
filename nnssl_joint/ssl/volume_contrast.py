"""Contrastive volume term (ours, on by default since the twenty-third pass; term ``volume_contrast``):
InfoNCE on the volume features Z of the two 3D views of every window, with the other windows as negatives.

Why: L_inter is a clustering loss. Its Sinkhorn codes are uniform when all windows score alike, so when
the windows' Z share almost all of their direction (docs/pretraining.md, sixth pass: 99.999% after f_inter's
first layer) nothing in the objective asks f_inter to tell windows apart. This term asks exactly that: Z of
view A of window i must be closer to Z of view B of window i than to Z of any other window, so a component
every window shares lowers no loss and the differences between windows are what the logits are made of.

For a local batch of B windows with L2-normalised features a_i, b_i (views A and B) and a FIFO queue of
earlier, detached features q_k:

    keys      = [a_1..a_B, b_1..b_B, q_1..q_L]
    logit_rk  = <query_r, key_k> / temperature          queries [a_1..a_B, b_1..b_B]
    positive  = the other view of the same window
    excluded  = the query itself, and every other key of the same case (overlapping windows of one volume
                are not negatives), except the positive
    loss      = mean over queries of cross-entropy(logits, positive)

In-batch keys carry gradients (SimCLR); the queue does not (a memory bank of the model's own recent
outputs, like SwAV's queue, without a momentum encoder). After a training step's forward both views' features
enter the queue with their case numbers (skipped when not finite). A query without any negative (one window,
empty queue) contributes 0. Under DDP with momentum keys (below; the default) the keys and case numbers of
every process are gathered before the logits, so each process's queries meet the keys of the whole global
batch and every queue receives the same global keys: the loss and, after DDP's gradient averaging, the update
are those of one process on the concatenated batch (equal shares per process, as the trainer's loaders draw
them). Without momentum keys the in-batch keys carry gradients and each process contrasts its own share
against its own queue (not a global-batch computation).

Measured (docs/pretraining.md, seventh pass): with keys from the online network, the queue holds features of
earlier weights, and the term fell by moving every window's Z away from them together (f_inter's feed-forward
gain 32-45, Z collapsed, the term back at chance level). Hence the momentum key network (MoCo, He et al.
2020): with ``momentum`` > 0 the caller passes ``keys``, the two views' features from an exponential moving
average of the encoder, g and f_inter (no gradient); the positive of view A's query is view B's key and vice
versa, the in-batch negatives are the keys of the other windows, and the queue holds keys, which change as
slowly as the moving average.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nnssl_joint.ssl.distributed import all_gather_cat, rank_sizes, use_distributed, world_size_and_rank
from nnssl_joint.ssl.queue import FeatureQueue


class VolumeContrast(nn.Module):
    """InfoNCE between the two views' volume features (see the module docstring).

    The queue (a :class:`~nnssl_joint.ssl.queue.FeatureQueue` labelled with case numbers; None when
    ``queue_length`` is 0) is made of buffers: saved in ``state_dict``, so a resumed run continues exactly.
    """

    def __init__(self, dim: int, temperature: float = 0.2, queue_length: int = 128,
                 distributed: bool | None = None) -> None:
        super().__init__()
        if dim < 1 or temperature <= 0 or queue_length < 0:
            raise ValueError(f"VolumeContrast needs dim >= 1, temperature > 0 and queue_length >= 0, got "
                             f"{dim}, {temperature} and {queue_length}.")
        self.dim = dim
        self.temperature = float(temperature)
        self.queue_length = int(queue_length)
        self.queue = FeatureQueue(self.queue_length, dim, labelled=True) if self.queue_length > 0 else None
        self.distributed = distributed  # None: gather the momentum keys whenever a process group is ready

    def forward(self, view_a: Tensor, view_b: Tensor, case: Tensor,
                keys: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """``view_a``, ``view_b``: (B, D) volume features of the two views; ``case``: (B,) int64 case numbers
        (windows of one case are never each other's negatives); ``keys``: the two views' features from a
        momentum key network (None: the queries are their own keys). Returns the scalar loss; in training mode
        the keys then enter the queue."""
        if view_a.dim() != 2 or view_a.shape != view_b.shape or view_a.shape[1] != self.dim:
            raise ValueError(f"VolumeContrast expects two (batch, {self.dim}) tensors, got "
                             f"{tuple(view_a.shape)} and {tuple(view_b.shape)}.")
        if case.shape != (view_a.shape[0],):
            raise ValueError(f"VolumeContrast expects one case number per window, got shape "
                             f"{tuple(case.shape)} for {view_a.shape[0]} windows.")
        if keys is not None and (keys[0].shape != view_a.shape or keys[1].shape != view_a.shape):
            raise ValueError(f"VolumeContrast keys must match the queries' shape {tuple(view_a.shape)}, got "
                             f"{tuple(keys[0].shape)} and {tuple(keys[1].shape)}.")
        b = view_a.shape[0]
        case = case.to(device=view_a.device, dtype=torch.long)
        queries = F.normalize(torch.cat([view_a, view_b]).float(), dim=1)
        offset, total = 0, b  # this process's first window in the global batch, and the global batch size
        if keys is None:
            batch_keys, key_case = queries, torch.cat([case, case])
        else:
            key_a, key_b = (F.normalize(k.detach().float(), dim=1) for k in keys)
            key_case = case
            distributed = use_distributed(self.distributed)
            if distributed:  # keys carry no gradient: gathering them makes the term a global-batch one
                sizes = rank_sizes(b, case.device, distributed)
                offset, total = sum(sizes[:world_size_and_rank(distributed)[1]]), sum(sizes)
                # 3 collectives per step: the sizes, both key views in one tensor, the case numbers
                both = all_gather_cat(torch.stack([key_a, key_b], dim=1), distributed, sizes)
                key_a, key_b = both.unbind(1)
                key_case = all_gather_cat(case, distributed, sizes)
            batch_keys, key_case = torch.cat([key_a, key_b]), torch.cat([key_case, key_case])
        pushed, pushed_case = batch_keys.detach(), key_case
        if self.queue is not None:
            batch_keys = torch.cat([batch_keys, self.queue.get().to(queries.device)])
            key_case = torch.cat([key_case, self.queue.get_labels().to(case.device)])
        logits = queries @ batch_keys.T / self.temperature  # (2B, 2 * global B + queued rows)
        rows = torch.arange(2 * b, device=queries.device)
        local = torch.arange(b, device=queries.device) + offset
        own = torch.cat([local, local + total])  # each query's own key (in-batch column)
        positive = torch.cat([local + total, local])  # the other view's key of the same window
        excluded = key_case[None, :] == torch.cat([case, case])[:, None]
        excluded[rows, positive] = False
        excluded[rows, own] = True
        logits = logits.masked_fill(excluded, float("-inf"))
        loss = F.cross_entropy(logits, positive)
        if self.training:
            self._push(pushed, pushed_case)
        return loss

    @torch.no_grad()
    def _push(self, features: Tensor, case: Tensor) -> None:
        if self.queue is not None and bool(torch.isfinite(features).all()):
            self.queue.push(features, labels=case)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, temperature={self.temperature}, queue_length={self.queue_length}"
