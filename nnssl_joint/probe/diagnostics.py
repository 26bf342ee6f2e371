"""Label-free diagnostics of frozen pretrained parts, computed on the probe's volumes.

* ``rankme``: effective rank exp(H(p)), p = singular values / their sum (Garrido et al., ICML 2023,
  "RankMe"), of slice embeddings e = g(f_intra(x)) and of volume features Z;
* ``retrieval_top1``: each window's Z under a second, perturbed view (in-plane flip, contrast x1.1,
  Gaussian noise 0.1; seeded) must retrieve the same window's first view among all windows of the
  held-back (test) volumes, and back (mean of both directions); chance = 1 / number of windows;
* ``slice_position_r2``: ridge regression of a slice's relative position in its volume from f_inter's
  per-slice output, fitted on the fit volumes' windows, R^2 on the test volumes' windows;
* prototype usage entropy (normalised, 1 = uniform) of the 2D and 3D SwAV prototypes (checkpoints only);
* ``mean_pairwise_cosine`` of Z (1 = every window maps to one point: collapse).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from nnssl_joint.probe.data import ProbeCase
from nnssl_joint.probe.features import embed_windows, slice_embeddings, volume_windows, window_starts
from nnssl_joint.probe.weights import ProbeWeights

DEFAULT_N_SLICES = 16
DEFAULT_VIEW_SIZE = 48


def rankme(embeddings: Tensor | np.ndarray, eps: float = 1e-7) -> float:
    """exp(entropy of the normalised singular values) of an (n, d) matrix; 1 <= rank <= min(n, d)."""
    x = torch.as_tensor(np.asarray(embeddings), dtype=torch.float64)
    if x.shape[0] < 2:
        return float("nan")
    s = torch.linalg.svdvals(x)
    p = s / s.sum().clamp_min(eps) + eps
    return float(torch.exp(-(p * p.log()).sum()))


def mean_pairwise_cosine(z: Tensor | np.ndarray) -> float:
    """Mean cosine similarity over pairs of different rows."""
    x = F.normalize(torch.as_tensor(np.asarray(z), dtype=torch.float64), dim=1)
    n = x.shape[0]
    if n < 2:
        return float("nan")
    gram = x @ x.T
    return float((gram.sum() - gram.diagonal().sum()) / (n * (n - 1)))


def retrieval_top1(a: Tensor, b: Tensor) -> float:
    """Top-1 retrieval by cosine of row i of ``b`` from row i of ``a`` and back,
    averaged over both directions."""
    return float(retrieval_hits(a, b).mean())


def retrieval_hits(a: Tensor, b: Tensor) -> Tensor:
    """Per row i: the share of the two directions of :func:`retrieval_top1` (row i of ``a`` finds row i
    of ``b`` by cosine, and back) that hit (0, 0.5 or 1); their mean is :func:`retrieval_top1`."""
    sims = F.normalize(a.double(), dim=1) @ F.normalize(b.double(), dim=1).T
    target = torch.arange(len(a))
    return ((sims.argmax(1) == target).double() + (sims.argmax(0) == target).double()) / 2


def ridge_r2(x_fit: Tensor, y_fit: Tensor, x_test: Tensor, y_test: Tensor,
             alpha: float | None = None) -> float:
    """R^2 on the test rows of a ridge regression fitted on standardised fit rows (closed form, float64).
    ``alpha`` defaults to the number of fit rows (penalty 1 per unit of mean squared error): the probe has
    a few hundred slices for d >= 128 features, and a weak penalty fits noise (R^2 far below 0)."""
    alpha = float(len(x_fit)) if alpha is None else alpha
    x_fit, x_test, y_fit, y_test = (t.double() for t in (x_fit, x_test, y_fit, y_test))
    mean, std = x_fit.mean(0), x_fit.std(0).clamp_min(1e-8)
    a, b = (x_fit - mean) / std, (x_test - mean) / std
    y_mean = y_fit.mean()
    w = torch.linalg.solve(a.T @ a + alpha * torch.eye(a.shape[1], dtype=torch.float64),
                           a.T @ (y_fit - y_mean))
    residual = ((b @ w + y_mean - y_test) ** 2).sum()
    total = ((y_test - y_test.mean()) ** 2).sum().clamp_min(1e-12)
    return float(1 - residual / total)


def perturbed_view(windows: np.ndarray, seed: int) -> np.ndarray:
    """The second view of windows (W, C, N, H, W') for retrieval: flipped in-plane, contrast x1.1,
    noise 0.1."""
    rng = np.random.default_rng(seed)
    flipped = windows[..., ::-1] * 1.1
    return np.ascontiguousarray(flipped + 0.1 * rng.standard_normal(windows.shape), dtype=np.float32)


def window_settings(weights: Sequence[ProbeWeights], total_stride: int) -> tuple[int, int]:
    """(N slices, view size) of the windows: the first pretraining checkpoint's, else the defaults."""
    for w in weights:
        if "n_slices" in w.resolved and "view_size" in w.resolved:
            return int(w.resolved["n_slices"]), int(w.resolved["view_size"])
    view = max(2 * total_stride, int(np.ceil(DEFAULT_VIEW_SIZE / total_stride)) * total_stride)
    return DEFAULT_N_SLICES, view


def _windows(cases: Sequence[ProbeCase], n_slices: int,
             view: int) -> tuple[np.ndarray, list[int], list[np.ndarray]]:
    """All windows of the cases, the valid slice count of each and each slice's relative position."""
    windows, valid, positions = [], [], []
    for case in cases:
        depth = case.image.shape[1]
        w = volume_windows(case.image, n_slices, view)
        windows.append(w)
        for start in window_starts(depth, n_slices):
            k = min(n_slices, depth - start)
            valid.append(k)
            positions.append((start + np.arange(k)) / max(1, depth - 1))
    return np.concatenate(windows), valid, positions


@torch.no_grad()
def label_free_diagnostics(weights: ProbeWeights, fit: Sequence[ProbeCase], test: Sequence[ProbeCase],
                           n_slices: int, view_size: int, seed: int = 0) -> dict[str, Any]:
    """The diagnostics the weights support (keys absent where a part is missing)."""
    from nnssl_joint.ssl.swav import prototype_usage_entropy

    out: dict[str, Any] = {}
    stride = weights.preset.encoder.total_stride
    model = weights.model
    if weights.slice_embedding is None:
        return out
    emb = torch.cat([slice_embeddings(weights.encoder, weights.slice_embedding, c.image, stride)
                     for c in (*fit, *test)])
    out["rankme_slices"] = rankme(emb)
    out["n_slice_embeddings"] = int(emb.shape[0])
    device = next(model.parameters()).device if model is not None else None
    if model is not None:
        scores = model.intra_loss.prototypes(F.normalize(model.projection_2d(emb.to(device)), dim=1)).cpu()
        out["prototype_entropy_2d"] = abs(prototype_usage_entropy(scores))  # no -0.0
    if weights.slice_transformer is None:
        return out
    parts = (weights.encoder, weights.slice_embedding, weights.slice_transformer)
    fit_w, fit_valid, fit_pos = _windows(fit, n_slices, view_size)
    test_w, test_valid, test_pos = _windows(test, n_slices, view_size)
    fit_per_slice, fit_z = embed_windows(*parts, fit_w, fit_valid)
    test_per_slice, test_z = embed_windows(*parts, test_w, test_valid)
    _, test_z2 = embed_windows(*parts, perturbed_view(test_w, seed), test_valid)
    z = torch.cat([fit_z, test_z])
    out["rankme_z"] = rankme(z)
    out["z_mean_pairwise_cosine"] = mean_pairwise_cosine(z)
    out["retrieval_top1"] = retrieval_top1(test_z2, test_z)
    out["retrieval_chance"] = 1.0 / len(test_z)
    out["n_windows"] = {"fit": len(fit_z), "test": len(test_z)}

    def per_slice_rows(per_slice: Tensor, valid: list[int],
                       positions: list[np.ndarray]) -> tuple[Tensor, Tensor]:
        rows = torch.cat([per_slice[i, :k] for i, k in enumerate(valid)])
        return rows, torch.from_numpy(np.concatenate(positions))

    x_fit, y_fit = per_slice_rows(fit_per_slice, fit_valid, fit_pos)
    x_test, y_test = per_slice_rows(test_per_slice, test_valid, test_pos)
    out["slice_position_r2"] = ridge_r2(x_fit, y_fit, x_test, y_test)
    if model is not None:
        scores_3d = model.inter_loss.prototypes(model.projection_3d(z.to(device))).cpu()
        out["prototype_entropy_3d"] = abs(prototype_usage_entropy(scores_3d))
    return out


def collapse_check(model: Any, windows: np.ndarray, num_prototypes_2d: int,
                   max_slices: int = 256) -> dict[str, float]:
    """Direct representation-collapse measures on real slices (the prototype-usage entropy of argmax
    assignments can look healthy when every score is tied): the mean pairwise cosine of the 2D
    projections z of different slices (1 = all slices map to one point), the spread of the prototype
    scores z C^T over prototypes, and log K, the L_intra of uniform predictions."""
    x = torch.from_numpy(windows)
    slices = x.permute(0, 2, 1, 3, 4).reshape(-1, *x.shape[1:2], *x.shape[3:])
    slices = slices[slices.flatten(1).std(1) > 0][:max_slices]  # padding slices are all zero
    with torch.no_grad():
        z = F.normalize(model.projection_2d(model.embed_slices(slices)), dim=1)
        scores = model.intra_loss.prototypes(z)
    cos = z @ z.T
    n = len(z)
    off_diagonal = (cos.sum() - cos.diagonal().sum()) / max(1, n * (n - 1))
    return {"z_mean_pairwise_cosine": float(off_diagonal),
            "score_std_over_prototypes": float(scores.std(1).mean()),
            "log_k_2d": float(np.log(num_prototypes_2d)), "n_slices": int(n)}
