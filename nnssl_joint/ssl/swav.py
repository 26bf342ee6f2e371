"""SwAV swapped-prediction loss (Caron et al. 2020, "Unsupervised Learning of Visual Features by
Contrasting Cluster Assignments", Eq. 1-2), used for L_intra and L_inter of the AAAI 2023 paper
(Nguyen et al., "Joint Self-Supervised Image-Volume Representation Learning with Intra-Inter
Contrastive Clustering").
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nnssl_joint.ssl.distributed import all_reduce_, use_distributed
from nnssl_joint.ssl.prototypes import Prototypes
from nnssl_joint.ssl.queue import FeatureQueue
from nnssl_joint.ssl.sinkhorn import sinkhorn


def _validate_code_views(code_views: Sequence[int], num_views: int) -> None:
    if len(code_views) == 0:
        raise ValueError("code_views is empty; name at least one view (e.g. (0, 1)) to compute codes from.")
    if len(set(code_views)) != len(code_views):
        raise ValueError(f"code_views must not repeat a view, got {tuple(code_views)}.")
    for view in code_views:
        if not 0 <= view < num_views:
            raise ValueError(
                f"code view {view} does not exist: got {num_views} views (indices 0..{num_views - 1})."
            )


@torch.no_grad()
def standardize_scores(scores: Tensor, distributed: bool | None = None, eps: float = 1e-6) -> Tensor:
    """Centre and scale every prototype's scores (columns of a (B, K) matrix) over the samples of the global
    batch: (s - mean) / std. Codes computed from the result depend on how a sample differs from the others,
    not on the component all samples share (see ``SwAVLoss(standardize_code_scores=True)``).

    Under torch.distributed the mean and variance run over the rows of all ranks. A batch of fewer than 2
    rows in total is returned unchanged."""
    distributed = use_distributed(distributed)
    x = scores.float()
    stats = torch.cat([x.sum(0), (x * x).sum(0), x.new_tensor([x.shape[0]])])
    all_reduce_(stats, "sum", distributed)
    k = x.shape[1]
    count = stats[-1]
    if count < 2:
        return scores
    mean = stats[:k] / count
    var = (stats[k:2 * k] / count - mean * mean).clamp_min(0)
    return ((x - mean) / torch.sqrt(var + eps * eps)).to(scores.dtype)


def swapped_prediction_loss(
    scores: Sequence[Tensor],
    codes: Mapping[int, Tensor] | Sequence[Tensor],
    code_views: Sequence[int],
    temperature: float,
) -> Tensor:
    """Swapped prediction (SwAV Eq. 1-2): predict the code of view a from every other view v.

    loss = mean over a in ``code_views`` and v != a of  mean_b  -sum_k q_a[b, k] log softmax(s_v[b] / tau)_k

    Args:
        scores: per view, (B, K) prototype scores ``z_v @ C^T`` (carry the gradient).
        codes: the target codes q_a (B, K), rows summing to 1; either a mapping view index -> codes
            or a sequence aligned with ``code_views`` (``codes[i]`` belongs to ``code_views[i]``).
        code_views: indices of the views whose codes are targets (SwAV: the two global crops).
        temperature: softmax temperature tau (SwAV default 0.1).
    """
    num_views = len(scores)
    if num_views < 2:
        raise ValueError(f"swapped prediction needs at least 2 views, got {num_views}.")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 (SwAV uses 0.1), got {temperature}.")
    _validate_code_views(code_views, num_views)
    if not isinstance(codes, Mapping) and len(codes) != len(code_views):
        raise ValueError(
            f"codes given as a sequence must align with code_views: got {len(codes)} codes for "
            f"{len(code_views)} code views; pass a dict view index -> codes otherwise."
        )
    shape = scores[0].shape
    for view, view_scores in enumerate(scores):
        if view_scores.dim() != 2 or view_scores.shape != shape:
            raise ValueError(
                f"all views need scores of the same (batch, prototypes) shape; view 0 has {tuple(shape)}, "
                f"view {view} has {tuple(view_scores.shape)}."
            )

    log_predictions = [F.log_softmax(view_scores.float() / temperature, dim=1) for view_scores in scores]
    total = scores[0].new_zeros((), dtype=torch.float32)
    num_terms = 0
    for position, code_view in enumerate(code_views):
        target = codes[code_view] if isinstance(codes, Mapping) else codes[position]
        if target.shape != shape:
            raise ValueError(
                f"codes of view {code_view} have shape {tuple(target.shape)}, expected {tuple(shape)}."
            )
        target = target.detach().float()
        for view in range(num_views):
            if view == code_view:
                continue
            total = total - (target * log_predictions[view]).sum(dim=1).mean()
            num_terms += 1
    return total / num_terms


class SwAVLoss(nn.Module):
    """SwAV clustering loss with its prototypes, Sinkhorn codes and optional feature queues.

    ``forward(embeddings, iteration)`` takes one (B, D) L2-normalised embedding per view, global
    views first, then small multi-crop views. It

    1. re-normalises the prototypes once per new ``iteration`` (SwAV does it before every step);
    2. scores every view against the prototypes (prototype gradients are zero while
       ``iteration < freeze_prototypes_iterations``);
    3. computes codes for ``code_views`` with Sinkhorn under ``no_grad``, prepending the queue's
       embeddings (scored with the current prototypes) once ``iteration >= queue_start_iteration``
       and dropping their rows afterwards;
    4. pushes the code views' embeddings into their queues (training mode only; the queue fills
       from iteration 0, so it is ready at ``queue_start_iteration``);
    5. returns :func:`swapped_prediction_loss`.

    Prototypes and queues live in this module's ``state_dict``; behaviour depends only on
    ``iteration`` and that state, so resuming is exact.

    ``standardize_code_scores``: before Sinkhorn, every prototype's scores are centred and scaled over the
    rows that enter Sinkhorn (queue + global batch), :func:`standardize_scores`. The student side
    (``softmax(s / tau)``) keeps the raw scores. Meant for inputs that share one dominant component (the
    volume features Z of an InstanceNorm encoder): their raw scores differ by less than epsilon, so the codes
    are uniform and carry no signal; standardised, they tell the samples apart.
    """

    def __init__(
        self,
        dim: int,
        num_prototypes: int,
        temperature: float = 0.1,
        epsilon: float = 0.05,
        sinkhorn_iterations: int = 3,
        code_views: Sequence[int] = (0, 1),
        freeze_prototypes_iterations: int = 0,
        queue_length: int = 0,
        queue_start_iteration: int = 0,
        distributed: bool | None = None,
        standardize_code_scores: bool = False,
        centering_momentum: float | None = None,
        teacher_temperature: float = 0.04,
    ) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0 (SwAV uses 0.1), got {temperature}.")
        if epsilon <= 0:
            raise ValueError(f"epsilon must be > 0 (SwAV uses 0.05), got {epsilon}.")
        if sinkhorn_iterations < 1:
            raise ValueError(f"sinkhorn_iterations must be >= 1 (SwAV uses 3), got {sinkhorn_iterations}.")
        if len(code_views) == 0 or len(set(code_views)) != len(code_views) or min(code_views) < 0:
            raise ValueError(
                f"code_views must be distinct non-negative view indices, got {tuple(code_views)}."
            )
        if freeze_prototypes_iterations < 0 or queue_length < 0 or queue_start_iteration < 0:
            raise ValueError(
                "freeze_prototypes_iterations, queue_length and queue_start_iteration must be >= 0, got "
                f"{freeze_prototypes_iterations}, {queue_length}, {queue_start_iteration}."
            )
        self.temperature = temperature
        self.epsilon = epsilon
        self.sinkhorn_iterations = sinkhorn_iterations
        self.code_views = tuple(int(v) for v in code_views)
        self.freeze_prototypes_iterations = freeze_prototypes_iterations
        self.queue_start_iteration = queue_start_iteration
        self.distributed = distributed
        self.standardize_code_scores = standardize_code_scores
        if centering_momentum is not None and not 0.0 <= centering_momentum < 1.0:
            raise ValueError(f"centering_momentum must lie in [0, 1) (DINO uses 0.9), "
                             f"got {centering_momentum}.")
        if teacher_temperature <= 0:
            raise ValueError(f"teacher_temperature must be > 0 (DINO uses 0.04), got {teacher_temperature}.")
        self.centering_momentum = centering_momentum
        self.teacher_temperature = teacher_temperature
        if centering_momentum is not None:  # only then: other configurations keep their state_dict keys
            self.register_buffer("center", torch.zeros(num_prototypes))
            self.register_buffer("center_initialized", torch.zeros((), dtype=torch.bool))
        self.prototypes = Prototypes(dim, num_prototypes)
        self.queues = (
            nn.ModuleList(FeatureQueue(queue_length, dim) for _ in self.code_views) if queue_length else None
        )
        self._normalized_at: int | None = None

    def normalize_prototypes(self) -> None:
        """Re-normalise the prototypes now (``forward`` does it once per new iteration)."""
        self.prototypes.normalize_()

    def queue_active(self, iteration: int) -> bool:
        """Whether codes at ``iteration`` are computed over queue + batch."""
        return self.queues is not None and iteration >= self.queue_start_iteration

    def forward(self, embeddings: Sequence[Tensor], iteration: int) -> Tensor:
        num_views = len(embeddings)
        if num_views < 2:
            raise ValueError(f"SwAVLoss needs at least 2 views of the same samples, got {num_views}.")
        _validate_code_views(self.code_views, num_views)
        batch_size = embeddings[0].shape[0]
        if any(z.dim() != 2 or z.shape[0] != batch_size for z in embeddings):
            raise ValueError(
                "SwAVLoss expects one (batch, dim) embedding per view with the same batch size, got shapes "
                f"{[tuple(z.shape) for z in embeddings]}."
            )
        if iteration != self._normalized_at:
            self.prototypes.normalize_()
            self._normalized_at = iteration

        frozen = iteration < self.freeze_prototypes_iterations
        scores = list(self.prototypes(torch.cat(list(embeddings), dim=0), frozen=frozen).split(batch_size))

        codes: dict[int, Tensor] = {}
        if self.centering_momentum is not None:
            codes = self._centered_codes(scores)
            return swapped_prediction_loss(scores, codes, self.code_views, self.temperature)
        with torch.no_grad():
            for position, view in enumerate(self.code_views):
                view_scores = scores[view].detach()
                queue = self.queues[position] if self.queues is not None else None
                if queue is not None and self.queue_active(iteration) and len(queue) > 0:
                    queue_scores = F.linear(
                        queue.get().to(view_scores), self.prototypes.weight.to(view_scores)
                    )
                    view_scores = torch.cat([queue_scores, view_scores], dim=0)
                if self.standardize_code_scores:
                    view_scores = standardize_scores(view_scores, self.distributed)
                codes[view] = sinkhorn(view_scores, self.epsilon, self.sinkhorn_iterations, self.distributed)[
                    -batch_size:
                ]
            if self.queues is not None and self.training:
                for position, view in enumerate(self.code_views):
                    self.queues[position].push(embeddings[view])
        return swapped_prediction_loss(scores, codes, self.code_views, self.temperature)

    @torch.no_grad()
    def _centered_codes(self, scores: Sequence[Tensor]) -> dict[int, Tensor]:
        """DINO-style codes (Caron et al. 2021): softmax((s - c) / teacher_temperature), c an EMA of the mean
        score of the code views over the global batch, updated after use. Centring keeps one prototype from
        taking every sample, the low temperature keeps the codes from being uniform; no queue needed."""
        codes = {view: F.softmax((scores[view].detach().float() - self.center) / self.teacher_temperature,
                                 dim=1)
                 for view in self.code_views}
        if self.training:
            distributed = use_distributed(self.distributed)
            stacked = torch.cat([scores[view].detach().float() for view in self.code_views])
            stats = torch.cat([stacked.sum(0), stacked.new_tensor([stacked.shape[0]])])
            all_reduce_(stats, "sum", distributed)
            mean = stats[:-1] / stats[-1].clamp_min(1)
            if bool(self.center_initialized):
                self.center.mul_(self.centering_momentum).add_((1 - self.centering_momentum) * mean)
            else:
                self.center.copy_(mean)
                self.center_initialized.fill_(True)
        return codes

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, epsilon={self.epsilon}, "
            f"sinkhorn_iterations={self.sinkhorn_iterations}, code_views={self.code_views}, "
            f"freeze_prototypes_iterations={self.freeze_prototypes_iterations}, "
            f"queue_start_iteration={self.queue_start_iteration}, "
            f"standardize_code_scores={self.standardize_code_scores}, "
            f"centering_momentum={self.centering_momentum}, teacher_temperature={self.teacher_temperature}"
        )


@torch.no_grad()
def prototype_usage_entropy(scores_or_codes: Tensor) -> float:
    """Normalised entropy in [0, 1] of how often each prototype is a sample's argmax.

    A collapse indicator for logging: 1 means every prototype is used equally often, 0 means all
    samples pick the same prototype. With fewer samples than prototypes the maximum reachable
    value is log(B) / log(K).
    """
    if scores_or_codes.dim() != 2:
        raise ValueError(f"expected a (batch, prototypes) matrix, got shape {tuple(scores_or_codes.shape)}.")
    return assignment_usage_entropy(scores_or_codes.argmax(dim=1), scores_or_codes.shape[1])


@torch.no_grad()
def assignment_usage_entropy(assignments: Tensor, num_prototypes: int) -> float:
    """:func:`prototype_usage_entropy` of samples already assigned to prototypes (1-D prototype indices)."""
    if num_prototypes < 2 or assignments.numel() == 0:
        return 0.0
    counts = torch.bincount(assignments.reshape(-1), minlength=num_prototypes).double()
    probabilities = counts[counts > 0] / counts.sum()
    entropy = -(probabilities * probabilities.log()).sum().item()
    return float(entropy / math.log(num_prototypes))
