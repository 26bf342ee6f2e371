"""The pretraining network: f_intra, g, f_inter, the heads and the clustering losses in one module.

The clustering losses (with their prototypes and queues) live inside the network so that DDP
all-reduces prototype gradients like any other parameter and a checkpoint's ``network_weights``
holds the whole learnable state. ``encoder``, ``slice_embedding`` and ``slice_transformer`` are built
by :mod:`nnssl_joint.models.encoder`, the same builders the downstream networks use, so their keys
load one to one into ``JointSSLUNet2D`` / ``SliceWiseUNet3D``.

Forward computes the loss terms of Nguyen et al. (AAAI 2023) that the current stage needs:

* ``intra``: SwAV swapped prediction between the views (2 global + small multi-crop views) of 2D
  images and single slices;
* ``intra_3d``: the same loss between slice n of the two 3D views of a volume window (valid slices);
* ``mask`` and ``inter``: each 3D view's slice embeddings, with the same random slices replaced by the
  mask token, go through f_inter once; the decoder predicts the detached original embeddings at the
  masked slices (L_mask) and the pooled volume feature Z of the two views enters the 3D clustering
  loss (L_inter). One pass serves both terms: Z is the masked pass's, like BERT's sentence feature.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from nnssl_joint.models.encoder import build_encoder_2d, build_slice_embedding, build_slice_transformer
from nnssl_joint.models.masked_prediction import (
    MaskedSliceModeling,
    masked_embedding_loss,
    sample_slice_mask,
    standardize_targets,
)
from nnssl_joint.models.preset import ArchitecturePreset
from nnssl_joint.models.slice_embedding import ProjectionHead
from nnssl_joint.ssl.objective import (
    TERM_INTER,
    TERM_INTRA,
    TERM_INTRA_3D,
    TERM_MASK,
    TERM_VARCOV,
    ObjectiveConfig,
    StagePlan,
)
from nnssl_joint.ssl.swav import SwAVLoss
from nnssl_joint.ssl.varcov import masked_mean, variance_covariance_loss


class JointSSLModel(nn.Module):
    def __init__(self, preset: ArchitecturePreset, input_channels: int, objective: ObjectiveConfig) -> None:
        super().__init__()
        if objective.clustering != "swav":
            raise ValueError(
                f"objective.clustering={objective.clustering!r}: the pretraining trainer wires the SwAV "
                "variant; DeepCluster-v2 (nnssl_joint.ssl.deepcluster) is available "
                "as a building block only. "
                "Set objective.clustering to 'swav'."
            )
        self.preset = preset
        self.objective = objective
        d = preset.embedding_dim
        proj = preset.projection
        self.encoder = build_encoder_2d(preset, input_channels)
        self.slice_embedding = build_slice_embedding(preset)
        self.slice_transformer = build_slice_transformer(preset)
        # SwAV's BatchNorm removes the component all embeddings share, which the pooled descriptors of an
        # InstanceNorm encoder are dominated by; without it the 2D loss collapsed to log(K) in our runs.
        # GlobalBatchNorm1d normalises over the global batch under DDP. Volume batches hold a handful of
        # windows, so the 3D head uses LayerNorm.
        self.projection_2d = ProjectionHead(d, proj.hidden_dim, proj.out_dim, norm="batch")
        self.projection_3d = ProjectionHead(d, proj.hidden_dim, proj.out_dim, norm=objective.head_norm_3d)
        self.masked_modeling = MaskedSliceModeling(d)
        common = {
            "temperature": objective.temperature,
            "epsilon": objective.epsilon,
            "sinkhorn_iterations": objective.sinkhorn_iterations,
            "freeze_prototypes_iterations": objective.freeze_prototypes_iterations,
            "queue_start_iteration": objective.queue_start_iteration,
        }
        self.intra_loss = SwAVLoss(proj.out_dim, objective.num_prototypes_2d,
                                   queue_length=objective.queue_length_2d, **common)
        self.inter_loss = SwAVLoss(proj.out_dim, objective.num_prototypes_3d,
                                   queue_length=objective.queue_length_3d,
                                   standardize_code_scores=objective.inter_code_standardization,
                                   centering_momentum=(objective.centering_momentum_3d
                                                       if objective.inter_codes == "centering" else None),
                                   teacher_temperature=objective.teacher_temperature_3d, **common)

    # ------------------------------------------------------------------ embeddings
    def embed_slices(self, x: Tensor) -> Tensor:
        """(M, C, H, W) images/slices -> (M, d) slice embeddings e = g(f_intra(x))."""
        return self.slice_embedding(self.encoder(x))

    def pretrained_state_dict(self) -> dict[str, Tensor]:
        """Only the parts downstream networks reuse (encoder, slice_embedding, slice_transformer)."""
        keep = ("encoder.", "slice_embedding.", "slice_transformer.")
        return {k: v for k, v in self.state_dict().items() if k.startswith(keep)}

    # ------------------------------------------------------------------ losses
    def forward(self, slices: dict[str, Any] | None, volumes: dict[str, Any] | None, iteration: int,
                stage: StagePlan) -> dict[str, Tensor]:
        """Loss terms (unweighted) of the active stage plus diagnostics (``_``-prefixed, detached)."""
        out: dict[str, Tensor] = {}
        want_intra = stage.is_active(TERM_INTRA) and slices is not None
        want_3d = volumes is not None and stage.needs_volumes
        want_intra_3d = want_3d and stage.is_active(TERM_INTRA_3D)
        freeze = stage.freeze_intra

        # one encoder pass for every input of the global view size (2D global views + volume slices)
        same_size: list[Tensor] = []
        if want_intra:
            g = slices["global_views"]  # (B2, 2, C, h, w)
            b2, n_global = g.shape[:2]
            same_size.append(g.flatten(0, 1))
        if want_3d:
            v = volumes["views"]  # (B3, 2, C, N, h, w)
            b3, n_views, c, n, h, w = v.shape
            same_size.append(v.permute(0, 1, 3, 2, 4, 5).reshape(b3 * n_views * n, c, h, w))
        if not same_size:
            return out
        with torch.set_grad_enabled(torch.is_grad_enabled() and not freeze):
            emb = self.embed_slices(torch.cat(same_size, 0))
            small = None
            if want_intra and slices.get("small_views") is not None and slices["small_views"].shape[1] > 0:
                s = slices["small_views"]
                small = self.embed_slices(s.flatten(0, 1)).view(s.shape[0], s.shape[1], -1)
        varcov_parts: list[Tensor] = []
        want_varcov = stage.is_active(TERM_VARCOV)
        if want_varcov and not freeze:
            rows = [torch.ones(emb.shape[0] - (b3 * n_views * n if want_3d else 0), dtype=torch.bool,
                               device=emb.device)]
            if want_3d:
                rows.append(volumes["valid"].to(torch.bool)[:, None, :].expand(b3, n_views, n).reshape(-1))
            varcov_parts.append(self._varcov(emb[torch.cat(rows)]))
        offset = 0
        if want_intra:
            e2 = emb[: b2 * n_global].view(b2, n_global, -1)
            offset = b2 * n_global
            views = [e2[:, i] for i in range(n_global)]
            if small is not None:
                views += [small[:, i] for i in range(small.shape[1])]
            z = [self.projection_2d(e) for e in views]
            out[TERM_INTRA] = self.intra_loss(z, iteration)
            with torch.no_grad():
                out["_assign_2d"] = self.intra_loss.prototypes(z[0].detach()).argmax(1)
        if want_3d:
            e3 = emb[offset:].view(b3, n_views, n, -1)
            valid = volumes["valid"].to(torch.bool)  # (B3, N)
            if want_intra_3d:
                zs = self.projection_2d(e3[:, 0][valid])
                zt = self.projection_2d(e3[:, 1][valid])
                out[TERM_INTRA_3D] = self.intra_loss([zs, zt], iteration)
            if stage.is_active(TERM_MASK) or stage.is_active(TERM_INTER):
                mask = None
                if stage.is_active(TERM_MASK):
                    # a loader (or a test) may fix the mask; otherwise draw it here
                    mask = volumes.get("mask")
                    mask = (mask.to(torch.bool) if mask is not None
                            else sample_slice_mask(valid, self.objective.mask_ratio))
                zs_3d, mask_losses, pooled = [], [], []
                targets = e3.detach()
                if mask is not None and self.objective.mask_target_normalization == "standardize":
                    targets = standardize_targets(targets.flatten(0, 1), valid.repeat_interleave(n_views, 0)
                                                  ).view_as(targets)
                for view in range(n_views):
                    tokens = e3[:, view]
                    if mask is not None:
                        tokens = self.masked_modeling.apply_mask(tokens, mask)
                    per_slice, volume_feature = self.slice_transformer(tokens, valid)
                    if mask is not None:
                        pred = self.masked_modeling(per_slice)
                        mask_losses.append(masked_embedding_loss(
                            pred, targets[:, view], mask, valid,
                            all_positions=self.objective.mask_loss_all_positions))
                    zs_3d.append(self.projection_3d(volume_feature))
                    if want_varcov:
                        pooled.append(masked_mean(per_slice, valid))
                if mask is not None:
                    out[TERM_MASK] = torch.stack(mask_losses).mean()
                if stage.is_active(TERM_INTER):
                    out[TERM_INTER] = self.inter_loss(zs_3d, iteration)
                    with torch.no_grad():
                        out["_assign_3d"] = self.inter_loss.prototypes(zs_3d[0].detach()).argmax(1)
                if pooled:
                    varcov_parts.append(self._varcov(torch.cat(pooled)))
        if varcov_parts:
            out[TERM_VARCOV] = torch.stack(varcov_parts).mean()
        return out

    def _varcov(self, rows: Tensor) -> Tensor:
        return variance_covariance_loss(rows, target_std=self.objective.varcov_target_std,
                                        covariance_weight=self.objective.varcov_covariance_weight)
