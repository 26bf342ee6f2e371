"""Label-free health read-outs of a pretrained :class:`~nnssl_joint.pretrain.model.JointSSLModel` on
held-back volume windows (METHOD.md, "How we know it works", read-out 1).

Interim module for ``scripts/ssl_ablation.py``: RankMe, cosine and retrieval come from
``nnssl_joint.probe.diagnostics``; what the probe lacks (held-back windows in two augmentations of the run's
own view pipeline, the masked-prediction check against interpolation) is here until the probe has it.

* prototype usage entropy (2D: slices, 3D: windows), normalised by log K (1 = uniform, 0 = one prototype);
* Z cross-view top-1 retrieval: each window in two augmentations; view a of window i must find view b of
  window i among all windows' view b (chance 1 / #windows), averaged over both directions;
* mean pairwise cosine of Z over different windows (1 = all windows one point);
* RankMe (Garrido et al. 2023): exp of the entropy of the normalised singular values, an effective rank;
* L_mask on standardised targets against a neighbour-interpolation baseline: the masked-slice decoder must
  predict a held-out slice embedding better than the mean of its two neighbours to have learnt anything
  from f_inter; ratio < 1 means better than interpolation;
* where in f_inter the windows become one point (:func:`f_inter_trace`): the share of the windows' mean
  token that all windows have in common, at f_inter's input and after every layer, and how much each
  layer's feed-forward block amplifies its input;
* the view-dependent read-outs over several draws of the two views, with intervals over the held-back
  volumes (:func:`view_draw_readouts`): with 14 windows one draw moves Z top-1 by a window or two.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from nnssl_joint.models.norms import window_statistics
from nnssl_joint.ssl.swav import assignment_usage_entropy, prototype_usage_entropy


def usage_entropy(scores: Tensor) -> float:
    """Normalised argmax usage entropy of (M, K) prototype scores."""
    return abs(prototype_usage_entropy(scores))


# RankMe, mean pairwise cosine and cross-view retrieval: the probe's definitions
# (nnssl_joint.probe.diagnostics)
def rankme(x: Tensor) -> float:
    from nnssl_joint.probe.diagnostics import rankme as probe_rankme

    return probe_rankme(x)


def mean_pairwise_cosine(x: Tensor) -> float:
    from nnssl_joint.probe.diagnostics import mean_pairwise_cosine as probe_cosine

    return probe_cosine(x)


def cross_view_top1(a: Tensor, b: Tensor) -> float:
    from nnssl_joint.probe.diagnostics import retrieval_top1

    return retrieval_top1(a, b)


def shared_share(x: Tensor) -> float:
    """(W, d) vectors -> ||mean_w x_w||^2 / mean_w ||x_w||^2: the share of their energy that all of them have
    in common (1: identical vectors; about 1 / W for independent centred ones; 0 when they cancel)."""
    energy = x.pow(2).sum(-1).mean()
    return float(x.mean(0).pow(2).sum() / energy.clamp_min(1e-30))


@torch.no_grad()
def f_inter_trace(transformer, tokens: Tensor, valid: Tensor | None = None) -> dict[str, float]:
    """Where f_inter (a :class:`~nnssl_joint.models.slice_transformer.SliceTransformer`) makes windows alike.

    ``tokens`` (W, N, d) slice embeddings of W windows, ``valid`` optional (W, N) bool. Each window is
    summarised by the mean of its valid tokens (what Z normalises); returns the :func:`shared_share` of
    those means at the input (``finter_shared_input``) and after every layer k (``finter_shared_layer{k}``),
    and every layer's feed-forward gain, mean token norm of the FFN's output over that of its input
    (``finter_ffn_gain_layer{k}``). A share near 1 after a layer whose input share is lower, with a large
    gain, says that layer's feed-forward block maps every window onto one common vector."""
    from nnssl_joint.models.slice_transformer import masked_slice_mean

    transformer.eval()
    outputs: dict[int, Tensor] = {}
    gains: dict[int, float] = {}

    def keep_output(k: int):
        return lambda module, args, out: outputs.__setitem__(k, out)

    def keep_gain(k: int):
        def hook(module, args, out):
            rows = valid.reshape(-1) if valid is not None else slice(None)
            inp, res = args[0].reshape(-1, args[0].shape[-1])[rows], out.reshape(-1, out.shape[-1])[rows]
            gains[k] = float(res.norm(dim=-1).mean() / inp.norm(dim=-1).mean().clamp_min(1e-30))
        return hook

    hooks = []
    for k, layer in enumerate(transformer.layers):
        hooks.append(layer.register_forward_hook(keep_output(k)))
        hooks.append(layer.ffn.register_forward_hook(keep_gain(k)))
    try:
        transformer(tokens, valid)
    finally:
        for hook in hooks:
            hook.remove()
    out = {"finter_shared_input": shared_share(masked_slice_mean(tokens, valid))}
    for k in range(len(transformer.layers)):
        out[f"finter_shared_layer{k}"] = shared_share(masked_slice_mean(outputs[k], valid))
        out[f"finter_ffn_gain_layer{k}"] = gains[k]
    return out


@torch.no_grad()
def window_features(model, views: Tensor, valid: Tensor) -> dict[str, Tensor]:
    """views (W, C, N, H, W') -> slice embeddings (W, N, d), Z (W, d), 3D head output and 3D scores."""
    w, c, n, h, wd = views.shape
    with window_statistics(model.encoder, valid):  # objective.norm_over_window, as in training
        emb = model.embed_slices(views.permute(0, 2, 1, 3, 4).reshape(w * n, c, h, wd)).view(w, n, -1)
    per_slice, z = model.slice_transformer(emb, valid)
    head = model.projection_3d(z)
    scores_3d = model.inter_loss.prototypes(head)
    return {"emb": emb, "per_slice": per_slice, "z": z, "head": head, "scores_3d": scores_3d}


@torch.no_grad()
def masked_vs_interpolation(model, emb: Tensor, valid: Tensor,
                            generator: torch.Generator) -> dict[str, float]:
    """Masked-slice prediction error on standardised embeddings vs the mean of the two neighbours.

    One interior valid slice per window is masked (positions whose both neighbours are valid), the tokens go
    through f_inter with the mask token there, the decoder predicts the slice's embedding. Embeddings are
    standardised per feature with the mean / std over all valid held-back slices, so a prediction cannot
    look good by the embeddings being small."""
    w, n, _ = emb.shape
    mask = torch.zeros((w, n), dtype=torch.bool)
    rows = []
    for i in range(w):
        interior = [p for p in range(1, n - 1) if valid[i, p - 1] and valid[i, p] and valid[i, p + 1]]
        if interior:
            p = interior[int(torch.randint(len(interior), (1,), generator=generator))]
            mask[i, p] = True
            rows.append((i, p))
    if not rows:
        return {"mask_mse_model": float("nan"), "mask_mse_interp": float("nan"),
                "mask_ratio_vs_interp": float("nan")}
    tokens = model.masked_modeling.apply_mask(emb, mask)
    per_slice, _ = model.slice_transformer(tokens, valid)
    pred = model.masked_modeling(per_slice)
    flat = emb[valid]
    mean, std = flat.mean(0), flat.std(0).clamp_min(1e-6)

    def norm(x: Tensor) -> Tensor:
        return (x - mean) / std

    idx_w = torch.tensor([r[0] for r in rows])
    idx_p = torch.tensor([r[1] for r in rows])
    target = norm(emb[idx_w, idx_p])
    # a decoder trained on standardised targets predicts in standardised units already
    standardized = getattr(model.objective, "mask_target_normalization", "none") == "standardize"
    prediction = pred[idx_w, idx_p] if standardized else norm(pred[idx_w, idx_p])
    model_err = (prediction - target).pow(2).mean().item()
    interp = norm((emb[idx_w, idx_p - 1] + emb[idx_w, idx_p + 1]) / 2)
    interp_err = (interp - target).pow(2).mean().item()
    return {"mask_mse_model": model_err, "mask_mse_interp": interp_err,
            "mask_ratio_vs_interp": model_err / max(interp_err, 1e-12)}


@torch.no_grad()
def volume_diagnostics(model, windows: Tensor, valid: Tensor, view_a: Tensor, view_b: Tensor,
                       seed: int = 0) -> dict[str, float]:
    """All read-outs on held-back windows (W, C, N, H, W') with validity (W, N) bool.

    ``view_a`` / ``view_b``: two augmentations of every window (same shape, padding slices zero), for the
    cross-view retrieval. The un-augmented windows give the entropies, cosine, RankMe and the
    masked-prediction check (``seed`` picks the masked slices)."""
    model.eval()
    views = [view_a, view_b]
    plain = window_features(model, windows, valid)
    a = window_features(model, views[0], valid)
    b = window_features(model, views[1], valid)
    slices = plain["emb"][valid]
    scores_2d = model.intra_loss.prototypes(model.projection_2d(slices))
    out = {
        "n_windows": len(windows),
        "entropy_2d": usage_entropy(scores_2d),
        "entropy_3d": usage_entropy(torch.cat([a["scores_3d"], b["scores_3d"]])),
        "z_top1_cross_view": cross_view_top1(a["z"], b["z"]),
        "head3d_top1_cross_view": cross_view_top1(a["head"], b["head"]),
        "z_mean_pairwise_cosine": mean_pairwise_cosine(plain["z"]),
        "emb_mean_pairwise_cosine": mean_pairwise_cosine(slices),
        "rankme_slices": rankme(slices),
        "rankme_z": rankme(plain["z"]),
        "chance_top1": 1.0 / len(windows),
    }
    out.update(masked_vs_interpolation(model, plain["emb"], valid, torch.Generator().manual_seed(seed)))
    out.update(f_inter_trace(model.slice_transformer, plain["emb"], valid))
    return out


def per_window_hits(a: Tensor, b: Tensor) -> Tensor:
    """(W,) share of the two retrieval directions that find window w's other view (0, 0.5 or 1); the mean
    is :func:`cross_view_top1` (the probe's ``retrieval_hits``)."""
    from nnssl_joint.probe.diagnostics import retrieval_hits

    return retrieval_hits(a, b)


def _normalised_entropy(assignments: Tensor, k: int) -> float:
    return abs(assignment_usage_entropy(assignments, k))  # one prototype: 0, not -0


@torch.no_grad()
def view_draw_readouts(draws: Sequence[tuple[dict[str, Tensor], dict[str, Tensor]]], plain_z: Tensor,
                       groups: Sequence[int], n_boot: int = 2000, seed: int = 0) -> dict[str, dict]:
    """Bar 1's view-dependent read-outs over R draws of the two views, each with a 95% interval.

    ``draws``: R pairs of :func:`window_features` outputs (view a, view b) of the same W windows;
    ``plain_z``: (W, d) Z of the un-augmented windows; ``groups``: the volume of each window. Z and 3D head
    top-1 are pooled over draws and both directions, 3D usage entropy over every draw's two views, the mean
    pairwise cosine over pairs of different windows. The intervals are percentile bootstraps that resample
    volumes (all windows of a volume together: the windows of one volume are not independent); they say
    how much the read-out depends on which volumes were held back, for this checkpoint."""
    if not draws:
        raise ValueError("view_draw_readouts needs at least one draw")
    groups_t = torch.as_tensor(list(groups))
    if len(groups_t) != len(plain_z):
        raise ValueError(f"groups has {len(groups_t)} entries for {len(plain_z)} windows")
    z_hits = torch.stack([per_window_hits(a["z"], b["z"]) for a, b in draws])  # (R, W)
    head_hits = torch.stack([per_window_hits(a["head"], b["head"]) for a, b in draws])
    k = draws[0][0]["scores_3d"].shape[1]
    assigned = torch.stack([torch.stack([a["scores_3d"].argmax(1), b["scores_3d"].argmax(1)])
                            for a, b in draws])  # (R, 2, W)
    zn = F.normalize(plain_z.double(), dim=1)
    gram = zn @ zn.T

    def statistics(index: Tensor) -> tuple[float, float, float, float]:
        different = index[:, None] != index[None, :]
        cosine = float(gram[index][:, index][different].mean()) if different.any() else float("nan")
        return (float(z_hits[:, index].mean()), float(head_hits[:, index].mean()),
                _normalised_entropy(assigned[:, :, index].reshape(-1), k), cosine)

    names = ("z_top1_cross_view", "head3d_top1_cross_view", "entropy_3d", "z_mean_pairwise_cosine")
    everything = torch.arange(len(plain_z))
    point = statistics(everything)
    volumes = torch.unique(groups_t)
    members = [everything[groups_t == g] for g in volumes]
    generator = torch.Generator().manual_seed(seed)
    boot = []
    for _ in range(n_boot):
        picked = torch.randint(len(volumes), (len(volumes),), generator=generator)
        boot.append(statistics(torch.cat([members[int(i)] for i in picked])))
    boot_t = torch.tensor(boot, dtype=torch.float64)
    per_draw = {"z_top1_cross_view": z_hits.mean(1), "head3d_top1_cross_view": head_hits.mean(1),
                "entropy_3d": torch.tensor([_normalised_entropy(assigned[r].reshape(-1), k)
                                            for r in range(len(draws))])}
    out: dict[str, dict] = {}
    for i, name in enumerate(names):
        column = boot_t[:, i][~torch.isnan(boot_t[:, i])]
        out[name] = {"value": point[i],
                     "ci95": [float(torch.quantile(column, 0.025)), float(torch.quantile(column, 0.975))]}
        if name in per_draw:
            out[name]["per_draw"] = [round(float(v), 4) for v in per_draw[name]]
    out["n"] = {"windows": len(plain_z), "volumes": len(volumes), "draws": len(draws), "bootstrap": n_boot}
    return out
