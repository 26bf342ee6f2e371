"""Dense read-outs of frozen features: a multinomial logistic regression and kNN label transfer.

The fit set's pixel features are standardised with the mean and standard deviation of all fit pixels;
features without variance on the fit set carry no information and are dropped (when none is left the
read-outs answer the fit set's most frequent class, i.e. background). Both read-outs are fitted on
class-balanced pixels drawn with a seeded generator:

* logistic regression: softmax cross-entropy + L2, full-batch L-BFGS in float64 with a fixed iteration
  budget, started from zero, so the same inputs give the same weights;
* kNN: cosine similarity of the standardised features, k nearest fit pixels, majority vote (ties go to
  the lower class index).

Dice is computed per test case and foreground class (2|P & G| / (|P| + |G|); NaN when both are empty).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nnssl_joint.probe.data import ProbeCase
from nnssl_joint.probe.features import iter_dense_features, slice_context


@dataclass(frozen=True)
class ReadoutSettings:
    pixels_per_class: int = 1000
    knn_pixels_per_class: int = 500
    knn_k: int = 10
    l2: float = 1e-2
    lbfgs_iterations: int = 100
    min_std: float = 1e-6
    seed: int = 0
    #: consecutive slices whose InstanceNorm statistics the encoder pools (1: each slice its own); the probe
    #: sets the target network's (:attr:`nnssl_joint.probe.data.ProbeTarget.norm_slices`)
    norm_slices: int = 1
    #: 0: the encoder's dense features only; N > 0 (``--volume-context``): f_inter's per-slice output over
    #: groups of N consecutive slices (the target's 3d_fullres patch depth) is appended to every pixel
    volume_context: int = 0
    #: with ``volume_context``: 0 appends all d values of f_inter's output; D > 0 appends its first D
    #: principal components, fitted on the fit cases' slices (``--volume-context-dims``)
    volume_context_dims: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def dice_scores(prediction: np.ndarray, label: np.ndarray, num_classes: int) -> list[float]:
    """Dice of foreground classes 1..K-1 (NaN where prediction and reference are both empty)."""
    out = []
    for c in range(1, num_classes):
        p, g = prediction == c, label == c
        denominator = int(p.sum()) + int(g.sum())
        out.append(float("nan") if denominator == 0
                   else 2.0 * float(np.logical_and(p, g).sum()) / denominator)
    return out


def balanced_pixel_indices(labels: Sequence[np.ndarray], num_classes: int, per_class: int,
                           rng: np.random.Generator) -> tuple[list[np.ndarray], np.ndarray]:
    """Up to ``per_class`` pixels of every class over all fit cases, without replacement.

    Returns (sorted flat indices per case, the class of each chosen pixel in case-then-index order)."""
    flat = np.concatenate([lab.reshape(-1) for lab in labels])
    offsets = np.cumsum([0] + [lab.size for lab in labels])
    chosen = []
    for c in range(num_classes):
        where = np.flatnonzero(flat == c)
        if len(where):
            chosen.append(rng.choice(where, size=min(per_class, len(where)), replace=False))
    chosen = np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)
    per_case = [chosen[(chosen >= offsets[i]) & (chosen < offsets[i + 1])] - offsets[i]
                for i in range(len(labels))]
    return per_case, flat[chosen]


class _RunningMoments:
    """Mean and variance per feature over chunks (Chan et al.'s pairwise merge, float64)."""

    def __init__(self) -> None:
        self.n = 0
        self.mean: Tensor | None = None
        self.m2: Tensor | None = None

    def update(self, x: Tensor) -> None:
        x = x.double()
        n, mean = x.shape[0], x.mean(0)
        m2 = ((x - mean) ** 2).sum(0)
        if self.mean is None:
            self.n, self.mean, self.m2 = n, mean, m2
            return
        total = self.n + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta ** 2 * (self.n * n / total)
        self.n = total

    def std(self) -> Tensor:
        return (self.m2 / max(1, self.n)).sqrt()


def fit_logistic_regression(x: Tensor, y: Tensor, num_classes: int, l2: float = 1e-2,
                            iterations: int = 100) -> tuple[Tensor, Tensor]:
    """Multinomial logistic regression, mean cross-entropy + l2/2 |W|^2, full-batch L-BFGS from zero.
    Returns (W (F, K), b (K,)) in float64."""
    x = x.double()
    weight = torch.zeros((x.shape[1], num_classes), dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=iterations, max_eval=iterations * 2,
                                  history_size=20, tolerance_grad=1e-10, tolerance_change=1e-14,
                                  line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ weight + bias, y) + 0.5 * l2 * (weight ** 2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return weight.detach(), bias.detach()


def knn_predict(queries: Tensor, bank: Tensor, bank_labels: Tensor, num_classes: int, k: int,
                rows_per_chunk: int = 8192) -> Tensor:
    """Majority vote of the ``k`` most cosine-similar bank rows (rows of both already L2-normalised)."""
    k = min(k, bank.shape[0])
    out = []
    for start in range(0, queries.shape[0], rows_per_chunk):
        sims = queries[start:start + rows_per_chunk] @ bank.T
        idx = sims.topk(k, dim=1).indices
        votes = F.one_hot(bank_labels[idx], num_classes).sum(1)
        out.append(votes.argmax(1))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


@torch.no_grad()
def fit_context_pca(encoder: nn.Module, fit: Sequence[ProbeCase], total_stride: int,
                    settings: ReadoutSettings,
                    context: tuple[nn.Module, nn.Module]) -> tuple[Tensor, Tensor, Tensor]:
    """Principal components of f_inter's per-slice output over every slice of the fit cases (the same
    groups as the read-out): returns (mean (d,), components (d, D), explained variance ratio (D,)), float64,
    D = ``settings.volume_context_dims``. Only fit cases enter, so the test cases stay unseen."""
    rows = torch.cat([slice_context(encoder, c.image, total_stride, context, settings.volume_context,
                                    norm_slices=settings.norm_slices) for c in fit]).double()
    dims = settings.volume_context_dims
    if not 0 < dims <= min(rows.shape):
        raise ValueError(f"volume_context_dims={dims}: the fit cases give {rows.shape[0]} slices of "
                         f"{rows.shape[1]} context values, so at most {min(rows.shape)} components; "
                         "choose fewer (--volume-context-dims)")
    mean = rows.mean(0)
    _, singular, vh = torch.linalg.svd(rows - mean, full_matrices=False)
    variance = singular ** 2
    explained = variance / variance.sum().clamp_min(torch.finfo(torch.float64).tiny)
    return mean, vh[:dims].T.contiguous(), explained[:dims]


@torch.no_grad()
def dense_probe(encoder: nn.Module, fit: Sequence[ProbeCase], test: Sequence[ProbeCase], num_classes: int,
                total_stride: int, settings: ReadoutSettings = ReadoutSettings(),
                context: tuple[nn.Module, nn.Module] | None = None) -> dict[str, Any]:
    """Linear probe and kNN read-out of ``encoder``'s dense features (every skip upsampled to full
    resolution and concatenated) on the fit cases, Dice on the test cases. With
    ``settings.volume_context`` > 0, ``context`` = (slice_embedding, slice_transformer) adds f_inter's
    per-slice output to every pixel's features (:func:`iter_dense_features`); with
    ``settings.volume_context_dims`` D > 0 only its first D principal components over the fit cases' slices
    (:func:`fit_context_pca`), so the regression has D context inputs instead of d to fit from few cases.

    Returns ``{"logistic": {case: [dice per foreground class]}, "knn": {...}, "fit": {...}}``."""
    if settings.volume_context_dims and not settings.volume_context:
        raise ValueError("volume_context_dims needs the volume-context read-out (volume_context > 0)")
    context_map = None
    context_record: dict[str, Any] = {}
    if settings.volume_context_dims:
        pca_mean, components, explained = fit_context_pca(encoder, fit, total_stride, settings, context)

        def context_map(per_slice: Tensor) -> Tensor:
            return (per_slice.double() - pca_mean) @ components

        context_record = {"context_dims": settings.volume_context_dims,
                          "context_explained_variance": float(explained.sum())}
    rng = np.random.default_rng(settings.seed)
    indices, sampled_labels = balanced_pixel_indices([c.label for c in fit], num_classes,
                                                     settings.pixels_per_class, rng)
    moments = _RunningMoments()
    sampled = []
    for case, chosen in zip(fit, indices):
        h, w = case.label.shape[1:]
        for start, feats in iter_dense_features(encoder, case.image, total_stride,
                                                norm_slices=settings.norm_slices, context=context,
                                                context_slices=settings.volume_context,
                                                context_map=context_map):
            flat = feats.reshape(-1, feats.shape[-1])
            moments.update(flat)
            lo, hi = start * h * w, start * h * w + flat.shape[0]
            inside = chosen[(chosen >= lo) & (chosen < hi)] - lo
            sampled.append(flat[torch.from_numpy(inside)])
    std = moments.std()
    informative = std > settings.min_std
    mean = moments.mean[informative]
    scale = std[informative]
    x = ((torch.cat(sampled).double()[:, informative] - mean) / scale) if sampled else torch.zeros(0, 0)
    y = torch.from_numpy(sampled_labels).long()
    counts = np.bincount(np.concatenate([c.label.reshape(-1) for c in fit]), minlength=num_classes)
    majority = int(counts.argmax())
    fit_record = {"pixels": len(y),
                  "pixels_per_class": np.bincount(sampled_labels, minlength=num_classes).tolist(),
                  "features": int(informative.numel()), "informative_features": int(informative.sum()),
                  **context_record}

    use_model = bool(informative.any())
    if use_model:
        weight, bias = fit_logistic_regression(x, y, num_classes, settings.l2, settings.lbfgs_iterations)
        bank_rows = []
        for c in range(num_classes):
            rows = np.flatnonzero(sampled_labels == c)
            if len(rows) > settings.knn_pixels_per_class:
                rows = np.sort(rng.choice(rows, settings.knn_pixels_per_class, replace=False))
            bank_rows.append(rows)
        bank_rows = np.concatenate(bank_rows)
        bank = F.normalize(x[torch.from_numpy(bank_rows)].float(), dim=1)
        bank_labels = y[torch.from_numpy(bank_rows)]
        fit_record["train_accuracy"] = float(((x @ weight + bias).argmax(1) == y).double().mean())

    result: dict[str, Any] = {"logistic": {}, "knn": {}, "fit": fit_record}
    for case in test:
        shape = case.label.shape
        pred_lr = np.full(shape, majority, dtype=np.int64)
        pred_knn = np.full(shape, majority, dtype=np.int64)
        if use_model:
            for start, feats in iter_dense_features(encoder, case.image, total_stride,
                                                    norm_slices=settings.norm_slices, context=context,
                                                    context_slices=settings.volume_context,
                                                    context_map=context_map):
                m = feats.shape[0]
                flat = (feats.reshape(-1, feats.shape[-1]).double()[:, informative] - mean) / scale
                pred_lr[start:start + m] = (flat @ weight + bias).argmax(1).view(m, *shape[1:]).numpy()
                knn = knn_predict(F.normalize(flat.float(), dim=1), bank, bank_labels, num_classes,
                                  settings.knn_k)
                pred_knn[start:start + m] = knn.view(m, *shape[1:]).numpy()
        result["logistic"][case.identifier] = dice_scores(pred_lr, case.label, num_classes)
        result["knn"][case.identifier] = dice_scores(pred_knn, case.label, num_classes)
    return result
