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
  With ``objective.volume_view_shift`` = s > 0 each view's f_inter pass (and the contrastive volume term's
  key pass) reads a sub-window of N - s window positions from its own random start in 0..s, so the views'
  volume features differ along the slice axis; the mask stays on the same slices.
* ``dense`` (ours, only when ``objective.lambda_dense > 0``; :mod:`nnssl_joint.ssl.dense`): InfoNCE between
  corresponding cells of the encoder skip ``objective.dense_stage`` in the two global views of the 2D items
  and of every valid window slice, from the views' coordinate maps (``'global_coords'`` / ``'coords'``); with
  ``objective.dense_slice_offset`` > 0 a window slice of view A is paired with a neighbouring slice of view B.

The clustering loss is SwAV (``objective.clustering == "swav"``, default) or DeepCluster-v2
(``"deepcluster"``, :mod:`nnssl_joint.ssl.deepcluster`): ``deepcluster_heads`` spherical k-means heads
over memory banks keyed by global sample indices (``nnssl_joint.data.loaders.SampleIndex``; the batches
carry them as ``'index'`` / ``'slice_indices'``). One slice bank serves the 2D terms: L_intra on the 2D
items (bank entry = (case, slice)) and L_intra_3d on the valid slices of the volume windows (the entry of
the slice they show), so both terms read the same pseudo-labels and write the same entries; a window bank
((case, window start)) serves L_inter with K = ``num_prototypes_3d`` per head. Each bank stores the
detached projected embeddings of the two global views (head h clusters view h % 2). ``forward`` only
queues the step's bank rows; the trainer writes them with :meth:`JointSSLModel.update_memory_banks` once
the step's loss is known to be finite (a skipped step leaves the banks untouched) and runs
:meth:`JointSSLModel.recompute_clusters` at the start of every epoch. Before a bank's first k-means the
DeepCluster terms are 0 (still in the graph). Banks, centroids, pseudo-labels and k-means counters are
buffers: checkpoints hold them and a resumed run continues exactly.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nnssl_joint.errors import NnsslJointError
from nnssl_joint.models.encoder import build_encoder_2d, build_slice_embedding, build_slice_transformer
from nnssl_joint.models.masked_prediction import (
    MaskedSliceModeling,
    masked_embedding_loss,
    sample_slice_mask,
    sample_sub_window_starts,
    sample_valid_slices,
    standardize_targets,
    take_sub_windows,
)
from nnssl_joint.models.norms import use_volume_statistics, window_statistics
from nnssl_joint.models.preset import ArchitecturePreset
from nnssl_joint.models.slice_embedding import ProjectionHead
from nnssl_joint.models.slice_transformer import masked_slice_mean
from nnssl_joint.ssl.deepcluster import DeepClusterV2Loss, MemoryBank, normalized_mutual_information
from nnssl_joint.ssl.dense import DenseProjectionHead, dense_correspondence_loss, window_slice_pairs
from nnssl_joint.ssl.objective import (
    TERM_DENSE,
    TERM_INTER,
    TERM_INTRA,
    TERM_INTRA_3D,
    TERM_MASK,
    TERM_VARCOV,
    TERM_VOLUME_CONTRAST,
    ObjectiveConfig,
    StagePlan,
)
from nnssl_joint.ssl.swav import SwAVLoss
from nnssl_joint.ssl.varcov import variance_covariance_loss
from nnssl_joint.ssl.volume_contrast import VolumeContrast

#: views of a sample stored in a DeepCluster memory bank (the two global views)
BANK_VIEWS = 2


class _ScaleGradient(torch.autograd.Function):
    """Identity in the forward pass; the backward pass multiplies the gradient by ``factor``."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, tensor: Tensor, factor: float) -> Tensor:
        ctx.factor = factor
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_output: Tensor) -> tuple[Tensor, None]:
        return grad_output * ctx.factor, None


def scale_gradient(tensor: Tensor, factor: float) -> Tensor:
    """``tensor`` unchanged, with its gradient multiplied by ``factor`` on the way back (1: plain)."""
    return tensor if factor == 1.0 else _ScaleGradient.apply(tensor, factor)


class JointSSLModel(nn.Module):
    """See the module docstring. ``slice_memory_size`` / ``window_memory_size`` (DeepCluster-v2 only): the
    sizes of the slice and window memory banks (``SampleIndex.num_slices`` / ``num_windows``); without them
    the banks are placeholders that take the size of the state dict they load (a network rebuilt from a
    checkpoint record). ``kmeans_seed`` seeds the k-means of every recompute (with the recompute count)."""

    def __init__(self, preset: ArchitecturePreset, input_channels: int, objective: ObjectiveConfig,
                 slice_memory_size: int | None = None, window_memory_size: int | None = None,
                 kmeans_seed: int = 0) -> None:
        super().__init__()
        if objective.clustering not in ("swav", "deepcluster"):
            raise ValueError(f"objective.clustering must be one of ('swav', 'deepcluster'), "
                             f"got {objective.clustering!r}.")
        self.deepcluster = objective.clustering == "deepcluster"
        self.preset = preset
        self.objective = objective
        d = preset.embedding_dim
        proj = preset.projection
        self.encoder = build_encoder_2d(preset, input_channels)
        if objective.norm_over_window:  # before the momentum copy below, which then has them too
            use_volume_statistics(self.encoder)
        self.slice_embedding = build_slice_embedding(preset)
        self.slice_transformer = build_slice_transformer(preset)
        # SwAV's BatchNorm removes the component all embeddings share, which the pooled descriptors of an
        # InstanceNorm encoder are dominated by; without it the 2D loss collapsed to log(K) in our runs.
        # GlobalBatchNorm1d normalises over the global batch under DDP. Volume batches hold a handful of
        # windows, so the 3D head uses LayerNorm.
        self.projection_2d = ProjectionHead(d, proj.hidden_dim, proj.out_dim, norm="batch")
        self.projection_3d = ProjectionHead(d, proj.hidden_dim, proj.out_dim, norm=objective.head_norm_3d)
        self.masked_modeling = MaskedSliceModeling(d)
        self.dense_head = None
        if objective.lambda_dense > 0:  # only then: other configurations keep their state_dict keys
            features = preset.encoder.features_per_stage
            if objective.dense_stage >= len(features):
                raise ValueError(f"objective.dense_stage={objective.dense_stage} does not exist: the "
                                 f"preset's encoder has {len(features)} stages (0-{len(features) - 1}).")
            channels = features[objective.dense_stage]
            self.dense_head = DenseProjectionHead(channels, channels, objective.dense_dim)
        self.volume_contrast = None
        self.volume_key_network = None
        if objective.lambda_volume_contrast > 0:  # only then, like the dense head
            self.volume_contrast = VolumeContrast(d, objective.volume_contrast_temperature,
                                                  objective.volume_contrast_queue)
            if objective.volume_contrast_momentum > 0:
                # momentum copy of the path to Z (MoCo's key encoder): no gradient, not pretrained weights
                self.volume_key_network = nn.ModuleDict({
                    "encoder": copy.deepcopy(self.encoder),
                    "slice_embedding": copy.deepcopy(self.slice_embedding),
                    "slice_transformer": copy.deepcopy(self.slice_transformer)})
                self.volume_key_network.requires_grad_(False)
        if self.deepcluster:
            self._build_deepcluster(objective, slice_memory_size, window_memory_size, kmeans_seed)
            return
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
                                   teacher_temperature=objective.teacher_temperature_3d,
                                   **{**common, "epsilon": (objective.epsilon if objective.epsilon_3d is None
                                                            else objective.epsilon_3d)})

    def _build_deepcluster(self, objective: ObjectiveConfig, slice_memory_size: int | None,
                           window_memory_size: int | None, kmeans_seed: int) -> None:
        dim = self.preset.projection.out_dim
        heads = objective.deepcluster_heads
        slice_memory_size = max(1, int(slice_memory_size or 1))
        window_memory_size = max(1, int(window_memory_size or 1))
        common = {"temperature": objective.temperature, "kmeans_iterations": objective.kmeans_iterations}
        self.intra_loss = DeepClusterV2Loss(dim, [objective.num_prototypes_2d] * heads, slice_memory_size,
                                            seed=2 * int(kmeans_seed), **common)
        self.inter_loss = DeepClusterV2Loss(dim, [objective.num_prototypes_3d] * heads, window_memory_size,
                                            seed=2 * int(kmeans_seed) + 1, **common)
        self.slice_bank = MemoryBank(slice_memory_size, dim, num_views=BANK_VIEWS)
        self.window_bank = MemoryBank(window_memory_size, dim, num_views=BANK_VIEWS)
        self._pending_banks: dict[str, tuple[Tensor, list[Tensor]]] = {}

    # ------------------------------------------------------------------ DeepCluster-v2 state
    @property
    def buffers_not_written_by_forward(self) -> tuple[str, ...]:
        """Buffer-name prefixes that ``forward`` never writes (the DeepCluster banks, centroids and labels
        change only in :meth:`update_memory_banks` / :meth:`recompute_clusters`): a trainer that restores
        the buffers after a skipped step need not copy them."""
        if not self.deepcluster:
            return ()
        return ("intra_loss.", "inter_loss.", "slice_bank.", "window_bank.")

    def _bank_groups(self) -> tuple[tuple[str, MemoryBank], ...]:
        """The row groups a step writes, in writing order: 2D items, then volume slices (both into the slice
        bank; separate updates, so that under DDP the order of rows, and so which of two rows of the same
        slice wins, is that of one process on the concatenated batch), then windows."""
        return (("2d", self.slice_bank), ("3d_slices", self.slice_bank), ("windows", self.window_bank))

    def _queue_bank_rows(self, group: str, indices: Tensor, views: list[Tensor]) -> None:
        if self.training:  # evaluation passes never write the banks
            self._pending_banks[group] = (indices.detach(), [z.detach() for z in views[:BANK_VIEWS]])

    def discard_memory_updates(self) -> None:
        """Forget the bank rows the last ``forward`` queued (a skipped, non-finite step)."""
        if self.deepcluster:
            self._pending_banks = {}

    @torch.no_grad()
    def update_memory_banks(self) -> None:
        """Write the rows the last training ``forward`` queued into the slice and window banks.

        Under DDP every rank must call it after every step (each group's update all-gathers, also when this
        rank has no rows), so that every rank holds the same, complete banks."""
        if not self.deepcluster:
            return
        for group, bank in self._bank_groups():
            if group in self._pending_banks:
                indices, views = self._pending_banks[group]
                rows = torch.stack(views)
            else:
                indices = torch.zeros(0, dtype=torch.long, device=bank.embeddings.device)
                rows = bank.embeddings.new_zeros((BANK_VIEWS, 0, bank.dim))
            bank.update(indices, rows)
        self.discard_memory_updates()

    @torch.no_grad()
    def recompute_clusters(self) -> dict[str, dict[str, float]]:
        """k-means on each bank that holds at least K filled entries (once per epoch, by the trainer).

        Returns per loss ("2d": L_intra / L_intra_3d, "3d": L_inter) what happened: ``samples`` (filled
        entries clustered, or found when too few), ``clusters`` (K), ``recomputes`` (count so far),
        ``done`` (1/0) and ``nmi`` (head 0, to the previous pseudo-labels of the entries labelled both times;
        NaN at the first recompute)."""
        report: dict[str, dict[str, float]] = {}
        if not self.deepcluster:
            return report
        for key, loss, bank in (("2d", self.intra_loss, self.slice_bank), ("3d", self.inter_loss,
                                                                            self.window_bank)):
            filled, k = bank.num_filled, max(loss.num_clusters)
            entry = {"samples": float(filled), "clusters": float(k), "done": 0.0, "nmi": float("nan")}
            if filled >= k:
                previous = loss.assignments[0].clone()
                loss.recompute_assignments(bank)
                current = loss.assignments[0]
                both = (previous >= 0) & (current >= 0)
                if bool(both.any()):
                    entry["nmi"] = normalized_mutual_information(previous[both], current[both])
                entry["done"] = 1.0
            entry["recomputes"] = float(int(loss.num_recomputes))
            report[key] = entry
        return report

    def _clustering_term(self, loss: nn.Module, views: list[Tensor], iteration: int, indices: Tensor | None,
                         bank: str, assign: bool = True) -> tuple[Tensor, Tensor | None]:
        """One clustering term over ``views`` and, with ``assign``, view 0's prototype / nearest-centroid
        assignment (the usage diagnostic; None before DeepCluster's first k-means).

        ``indices`` (global sample indices) given: DeepCluster-v2 against the pseudo-labels, and the rows are
        queued for the memory bank ``bank``; None: SwAV at ``iteration``."""
        if indices is not None:
            value = self._deepcluster_term(loss, views, indices)
            self._queue_bank_rows(bank, indices, views)
            return value, self._nearest_centroid(loss, views[0]) if assign else None
        value = loss(views, iteration)
        if not assign:
            return value, None
        with torch.no_grad():
            return value, loss.prototypes(views[0].detach()).argmax(1)

    def _deepcluster_term(self, loss: DeepClusterV2Loss, views: list[Tensor], indices: Tensor) -> Tensor:
        return loss([F.normalize(z.float(), dim=1) for z in views], indices)

    @staticmethod
    def _nearest_centroid(loss: DeepClusterV2Loss, z: Tensor) -> Tensor | None:
        """Head 0's nearest centroid per row (the usage diagnostic); None before the first k-means."""
        if not loss.has_assignments:
            return None
        return loss.prototypes(F.normalize(z.detach().float(), dim=1)).argmax(1)

    @staticmethod
    def _batch_entry(batch: dict[str, Any], key: str, what: str, needed_by: str, content: str,
                     loader_option: str, when: str = "") -> Tensor:
        """``batch[key]``, or an error naming the key, the option that needs it and the loader option that
        provides it."""
        if batch.get(key) is None:
            raise ValueError(
                f"{needed_by} needs {content} in the {what} batch (key {key!r}); build the loaders with "
                f"{loader_option} (nnssl_joint.data.loaders), as the pretraining trainer does{when}.")
        return batch[key]

    @classmethod
    def _batch_indices(cls, batch: dict[str, Any], key: str, what: str) -> Tensor:
        return cls._batch_entry(batch, key, what, "objective.clustering='deepcluster'",
                                "global sample indices", "sample_index=SampleIndex.from_summary(...)").long()

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
        self.discard_memory_updates()  # bank rows of an earlier forward that nobody wrote
        want_intra = stage.is_active(TERM_INTRA) and slices is not None
        want_3d = volumes is not None and stage.needs_volumes
        want_intra_3d = want_3d and stage.is_active(TERM_INTRA_3D)
        freeze = stage.freeze_intra
        want_dense = stage.is_active(TERM_DENSE) and self.dense_head is not None and not freeze

        # one encoder pass for every input of the global view size (2D global views + volume slices)
        same_size: list[Tensor] = []
        if want_intra:
            g = slices["global_views"]  # (B2, 2, C, h, w)
            b2, n_global = g.shape[:2]
            same_size.append(g.flatten(0, 1))
        if want_3d:
            v = volumes["views"]  # (B3, 2, C, N, h, w)
            b3, n_views, _, n = v.shape[:4]
            same_size.append(self._window_slices(v))
        if not same_size:
            return out
        leading = b2 * n_global if want_intra else 0  # window slices follow the 2D items
        windows = (self._window_statistics(self.encoder, volumes["valid"], n_views, leading) if want_3d
                   else contextlib.nullcontext())
        with torch.set_grad_enabled(torch.is_grad_enabled() and not freeze):
            with windows:
                skips = self.encoder(torch.cat(same_size, 0))
            emb = self.slice_embedding(skips)
            # per-cell projections of the chosen skip (rows, dense_dim, *grid): 2D items, then window slices
            cells = self.dense_head(skips[self.objective.dense_stage]) if want_dense else None
            small = None
            if want_intra and slices.get("small_views") is not None and slices["small_views"].shape[1] > 0:
                s = slices["small_views"]
                small = self.embed_slices(s.flatten(0, 1)).view(s.shape[0], s.shape[1], -1)
        varcov_parts: list[Tensor] = []
        dense_parts: list[Tensor] = []
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
            index_2d = (self._batch_indices(slices, "index", "2D").to(z[0].device)
                        if self.deepcluster else None)
            out[TERM_INTRA], assigned = self._clustering_term(self.intra_loss, z, iteration, index_2d, "2d")
            if assigned is not None:
                out["_assign_2d"] = assigned
            if cells is not None:
                items = cells[: b2 * n_global].unflatten(0, (b2, n_global))
                coords = self._coordinates(slices, "global_coords", "2D")
                dense_parts.append(self._dense(items[:, 0], items[:, 1], coords[:, 0], coords[:, 1],
                                               torch.arange(b2, device=items.device)))
        if want_3d:
            e3 = emb[offset:].view(b3, n_views, n, -1)
            valid = volumes["valid"].to(torch.bool)  # (B3, N)
            if cells is not None:
                window_slices = cells[offset:].unflatten(0, (b3, n_views, n))
                coords = self._coordinates(volumes, "coords", "volume")  # (B3, views, 3, h, w)
                window, slice_a, slice_b = window_slice_pairs(valid, self.objective.dense_slice_offset)
                dense_parts.append(self._dense(window_slices[window, 0, slice_a],
                                               window_slices[window, 1, slice_b],
                                               coords[window, 0], coords[window, 1], window))
            if want_intra_3d:
                rows = valid
                if self.objective.intra_3d_slices_per_window:
                    rows = sample_valid_slices(valid, self.objective.intra_3d_slices_per_window)
                zs = self.projection_2d(e3[:, 0][rows])
                zt = self.projection_2d(e3[:, 1][rows])
                slice_index = (self._batch_indices(volumes, "slice_indices", "volume").to(zs.device)[rows]
                               if self.deepcluster else None)
                out[TERM_INTRA_3D], _ = self._clustering_term(self.intra_loss, [zs, zt], iteration,
                                                              slice_index, "3d_slices", assign=False)
            want_contrast = stage.is_active(TERM_VOLUME_CONTRAST) and self.volume_contrast is not None
            if stage.is_active(TERM_MASK) or stage.is_active(TERM_INTER) or want_contrast:
                mask = None
                if stage.is_active(TERM_MASK):
                    # a loader (or a test) may fix the mask; otherwise draw it here
                    mask = volumes.get("mask")
                    mask = (mask.to(torch.bool) if mask is not None
                            else sample_slice_mask(valid, self.objective.mask_ratio))
                starts = self._sub_window_starts(valid, n_views)
                zs_3d, mask_losses, pooled, volume_features = [], [], [], []
                targets = e3.detach()
                if mask is not None and self.objective.mask_target_normalization == "standardize":
                    targets = standardize_targets(targets.flatten(0, 1), valid.repeat_interleave(n_views, 0)
                                                  ).view_as(targets)
                for view in range(n_views):
                    tokens = e3[:, view]
                    if not self.objective.volume_terms_train_encoder:
                        tokens = tokens.detach()
                    else:
                        tokens = scale_gradient(tokens, self.objective.volume_encoder_gradient_scale)
                    tokens, view_valid, view_targets = self._view_sub_window(starts, view, tokens, valid,
                                                                              targets[:, view])
                    view_mask = None if mask is None else self._view_sub_window(starts, view, mask)[0]
                    if mask is not None:
                        tokens = self.masked_modeling.apply_mask(tokens, view_mask)
                    per_slice, volume_feature = self.slice_transformer(tokens, view_valid)
                    if mask is not None:
                        pred = self.masked_modeling(per_slice)
                        mask_losses.append(masked_embedding_loss(
                            pred, view_targets, view_mask, view_valid,
                            all_positions=self.objective.mask_loss_all_positions))
                    zs_3d.append(self.projection_3d(volume_feature if self.objective.inter_trains_transformer
                                                    else volume_feature.detach()))
                    volume_features.append(volume_feature)
                    if want_varcov:
                        pooled.append(masked_slice_mean(per_slice, view_valid))
                if mask is not None:
                    out[TERM_MASK] = torch.stack(mask_losses).mean()
                if stage.is_active(TERM_INTER):
                    index_3d = (self._batch_indices(volumes, "index", "volume").to(zs_3d[0].device)
                                if self.deepcluster else None)
                    out[TERM_INTER], assigned = self._clustering_term(self.inter_loss, zs_3d, iteration,
                                                                      index_3d, "windows")
                    if assigned is not None:
                        out["_assign_3d"] = assigned
                if want_contrast:
                    case = self._batch_entry(volumes, "case", "volume",
                                             "objective.lambda_volume_contrast > 0",
                                             "each window's case number",
                                             "sample_index=SampleIndex.from_summary(...)").long()
                    keys = (self._momentum_keys(v, valid, starts) if self.volume_key_network is not None
                            else None)
                    out[TERM_VOLUME_CONTRAST] = self.volume_contrast(volume_features[0], volume_features[1],
                                                                     case, keys)
                if pooled:
                    varcov_parts.append(self._varcov(torch.cat(pooled)))
        if varcov_parts:
            out[TERM_VARCOV] = torch.stack(varcov_parts).mean()
        if dense_parts:
            out[TERM_DENSE] = torch.stack(dense_parts).mean()
        return out

    @staticmethod
    def _window_slices(views: Tensor) -> Tensor:
        """(B3, views, C, N, h, w) volume windows -> (B3 * views * N, C, h, w) slices, window by window."""
        b3, n_views, c, n, h, w = views.shape
        return views.permute(0, 1, 3, 2, 4, 5).reshape(b3 * n_views * n, c, h, w)

    def _sub_window_starts(self, valid: Tensor, n_views: int) -> Tensor | None:
        """The (B3, views) sub-window starts of ``objective.volume_view_shift`` (torch's generator), or None
        when it is 0 (every view reads the whole window; nothing is drawn)."""
        shift = self.objective.volume_view_shift
        if not shift:
            return None
        n = valid.shape[1]
        if shift >= n:
            raise NnsslJointError(
                f"objective.volume_view_shift={shift} leaves no window position for f_inter: the volume "
                f"windows hold {n} slices (data.n_slices), so the shift must be < {n}; set "
                f"volume_view_shift to at most {n // 2} (half the window) or use longer windows")
        return sample_sub_window_starts(valid.to(torch.bool), shift, n_views)

    def _view_sub_window(self, starts: Tensor | None, view: int, *tensors: Tensor) -> tuple[Tensor, ...]:
        """``tensors`` (B3, N, ...) as view ``view``'s f_inter pass reads them: the N - volume_view_shift
        positions from ``starts[:, view]`` (:meth:`_sub_window_starts`), or whole when ``starts`` is None."""
        if starts is None:
            return tensors
        length = tensors[0].shape[1] - self.objective.volume_view_shift
        return tuple(take_sub_windows(x, starts[:, view], length) for x in tensors)

    def _window_statistics(self, encoder: nn.Module, valid: Tensor, n_views: int,
                           leading_rows: int = 0) -> contextlib.AbstractContextManager:
        """With ``objective.norm_over_window``, the context in which ``encoder`` normalises each window (valid
        slices ``valid`` (B3, N)) over its valid slices (:func:`window_statistics`; one row per window in
        :meth:`_window_slices` order, after ``leading_rows`` 2D items); without it, nothing."""
        if not self.objective.norm_over_window:
            return contextlib.nullcontext()
        return window_statistics(encoder, valid.to(torch.bool).repeat_interleave(n_views, 0), leading_rows)

    @torch.no_grad()
    def _momentum_keys(self, views: Tensor, valid: Tensor,
                       starts: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The volume features of both views (B3, 2, C, N, h, w) from the momentum key network, after its
        update (training mode only): parameters m * key + (1 - m) * online, buffers copied. With ``starts``
        (B3, 2), each view's f_inter reads its sub-window of ``objective.volume_view_shift``."""
        keys = self.volume_key_network
        if self.training:
            m = self.objective.volume_contrast_momentum
            for name in ("encoder", "slice_embedding", "slice_transformer"):
                online = getattr(self, name)
                for key_p, p in zip(keys[name].parameters(), online.parameters()):
                    key_p.mul_(m).add_(p.detach(), alpha=1 - m)
                for key_b, b in zip(keys[name].buffers(), online.buffers()):
                    key_b.copy_(b)
        b3, n_views, _, n = views.shape[:4]
        with self._window_statistics(keys["encoder"], valid, n_views):
            skips = keys["encoder"](self._window_slices(views))
        emb = keys["slice_embedding"](skips).view(b3, n_views, n, -1)
        features = [keys["slice_transformer"](*self._view_sub_window(starts, view, emb[:, view], valid))[1]
                    for view in range(2)]
        return features[0], features[1]

    @classmethod
    def _coordinates(cls, batch: dict[str, Any], key: str, what: str) -> Tensor:
        return cls._batch_entry(batch, key, what, "objective.lambda_dense > 0", "each view's coordinate maps",
                                "coordinates=True", when=" when lambda_dense > 0")

    def _dense(self, fa: Tensor, fb: Tensor, ca: Tensor, cb: Tensor, source: Tensor) -> Tensor:
        return dense_correspondence_loss(fa, fb, ca, cb, source, temperature=self.objective.dense_temperature,
                                         max_queries=self.objective.dense_queries,
                                         max_keys=self.objective.dense_keys or None)

    def _varcov(self, rows: Tensor) -> Tensor:
        return variance_covariance_loss(rows, target_std=self.objective.varcov_target_std,
                                        covariance_weight=self.objective.varcov_covariance_weight)
