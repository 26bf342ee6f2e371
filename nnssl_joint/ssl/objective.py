"""The combined pretraining objective of Nguyen et al., "Joint Self-Supervised Image-Volume
Representation Learning with Intra-Inter Contrastive Clustering" (AAAI 2023), as data:

    L = lambda_intra * L_intra + lambda_intra_3d * L_intra_3d + lambda_inter * L_inter + lambda_mask * L_mask

- ``intra``: 2D clustering loss (SwAV swapped prediction or DeepCluster-v2) on views of 2D images
  and of single slices.
- ``intra_3d``: the same 2D loss between slice n of two 3D views of a volume (the paper's intent;
  missing from the authors' release; switch ``slice_level_3d_loss``).
- ``inter``: the clustering loss on the volume features Z of two 3D views.
- ``mask``: masked slice-embedding prediction (MSE).
- ``varcov`` (ours, off by default): VICReg's variance and covariance terms on the slice embeddings e and the
  un-normalised volume feature (:mod:`nnssl_joint.ssl.varcov`); active in every stage when its weight is > 0.
- ``dense`` (ours, on by default since the twenty-third pass): InfoNCE between corresponding cells of one
  skip level of f_intra in the two global views of 2D items and of volume windows
  (:mod:`nnssl_joint.ssl.dense`); active in every stage when its weight is > 0 (not while f_intra is frozen).
- ``volume_contrast`` (ours, on by default since the twenty-third pass): InfoNCE between the volume features Z
  of the two 3D views of a window, the other windows (of other cases) and a queue of earlier ones as negatives
  (:mod:`nnssl_joint.ssl.volume_contrast`); active wherever the volume terms are (every epoch of ``joint``,
  stage C of ``staged``) when its weight is > 0.

Two schedules: ``joint`` (every term in every iteration; our default) and ``staged`` (the authors'
runs): stage A L_intra only; stage B L_mask with f_intra frozen; stage C L_inter (+ L_intra and
L_intra_3d if ``staged_keep_intra``) with everything trainable.

Defaults (twenty-third pass, docs/pretraining.md): the configuration whose volume path does not collapse on
the generated data and on ``--real`` (the twenty-second pass's): the paper's four terms plus the contrastive
volume term with momentum keys and the dense term, L_inter on a detached Z without a 3D queue, a tenth of the
volume terms' gradient into the encoder, window statistics in the encoder. :data:`PAPER_OBJECTIVE` holds the
values of the paper's objective for the keys where they differ (:meth:`ObjectiveConfig.paper`;
``plans/pretrain/paper.json`` for ``NNSSL_JOINT_CONFIG``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor

TERM_INTRA = "intra"
TERM_INTRA_3D = "intra_3d"
TERM_INTER = "inter"
TERM_MASK = "mask"
TERM_VARCOV = "varcov"
TERM_DENSE = "dense"
TERM_VOLUME_CONTRAST = "volume_contrast"
LOSS_TERMS = (TERM_INTRA, TERM_INTRA_3D, TERM_INTER, TERM_MASK, TERM_VARCOV, TERM_DENSE, TERM_VOLUME_CONTRAST)
VOLUME_TERMS = (TERM_INTRA_3D, TERM_INTER, TERM_MASK, TERM_VOLUME_CONTRAST)
SCHEDULES = ("joint", "staged")
CLUSTERING_METHODS = ("swav", "deepcluster")
HEAD_NORMS_3D = ("layer", "running_batch")
INTER_CODES = ("sinkhorn", "centering")
MASK_TARGET_NORMALIZATIONS = ("none", "standardize")
#: the paper's objective where it differs from the defaults (the plugin's defaults before the twenty-third
#: pass, docs/pretraining.md): no contrastive volume term and no dense term, L_inter's and L_mask's whole
#: gradient through f_inter into the encoder, a 3D SwAV queue, per-slice encoder statistics.
#: ``plans/pretrain/paper.json`` holds the same values (and the optimiser's) for ``NNSSL_JOINT_CONFIG``; a
#: test keeps the two equal.
PAPER_OBJECTIVE: dict[str, Any] = {
    "lambda_dense": 0.0,
    "dense_slice_offset": 0,
    "lambda_volume_contrast": 0.0,
    "volume_contrast_momentum": 0.0,
    "queue_length_3d": 256,
    "volume_encoder_gradient_scale": 1.0,
    "inter_trains_transformer": True,
    "norm_over_window": False,
}


@dataclass(frozen=True)
class StagePlan:
    """What to optimise in one epoch: the active loss terms with their weights and whether the 2D
    encoder f_intra is frozen (stage B of the staged schedule)."""

    name: str
    weights: Mapping[str, float]
    freeze_intra: bool = False

    @property
    def active_terms(self) -> tuple[str, ...]:
        return tuple(term for term in LOSS_TERMS if term in self.weights)

    def is_active(self, term: str) -> bool:
        return term in self.weights

    @property
    def needs_volumes(self) -> bool:
        """Whether any active term needs 3D volume batches."""
        return any(term in self.weights for term in VOLUME_TERMS)

    @property
    def needs_images(self) -> bool:
        """Whether 2D image / single-slice batches are needed (for ``intra``)."""
        return TERM_INTRA in self.weights


@dataclass
class ObjectiveConfig:
    """Hyperparameters of the combined objective (AAAI 2023), recorded with the plans / checkpoint.

    Weights (a weight of 0 switches the term off):
        lambda_intra: L_intra, 2D clustering on images and slices.
        lambda_intra_3d: slice-level L_intra between two 3D views (only if ``slice_level_3d_loss``).
        lambda_inter: L_inter, clustering of the volume features Z.
        lambda_mask: L_mask, masked slice-embedding prediction.
        The paper sums the terms; 1.0 each is our default.
        lambda_varcov: our addition, 0 (off) by default: variance-covariance regulariser (VICReg) on the
            slice embeddings e of the step and on the un-normalised pooled f_inter output of the 3D views.
        varcov_target_std: the per-feature standard deviation the variance hinge asks for (VICReg: 1).
        varcov_covariance_weight: weight of the covariance part relative to the variance part (VICReg: 1/25).

    Schedule:
        schedule: "joint" (all terms every iteration, default) or "staged" (authors' runs).
        stage_a_epochs, stage_b_epochs: staged only; stage C runs from epoch A+B to the end.
            Defaults (100, 50) are ours; the paper does not report them. 0 skips a stage.
        staged_keep_intra: staged only; keep L_intra (and L_intra_3d) in stage C.

    Clustering (L_intra, L_intra_3d and L_inter):
        clustering: "swav" (Sinkhorn codes, swapped prediction) or "deepcluster" (DeepCluster-v2).
        temperature, epsilon, sinkhorn_iterations: SwAV defaults 0.1, 0.05, 3.
        epsilon_3d: ours; the Sinkhorn epsilon of L_inter's codes alone (None: ``epsilon``, shared with
            the 2D losses). Only Sinkhorn codes use it; with "centering" codes or DeepCluster it is refused.
        num_prototypes_2d: K for the 2D losses (authors 3000; small datasets need far fewer).
        num_prototypes_3d: K for L_inter (few, since there are few volumes).
        freeze_prototypes_iterations: prototypes get no update for this many iterations (SwAV);
            250 = one nnU-Net epoch.
        queue_length_2d, queue_length_3d: SwAV feature queue per code view (0 = off, the default of both).
            The paper's objective (:data:`PAPER_OBJECTIVE`) keeps a 3D queue of 256, since Sinkhorn's equal
            partition over 2-4 windows is nearly meaningless; with 8 windows per step and a detached Z the
            queue made L_inter swing between epochs (twelfth pass), hence 0.
        queue_start_iteration: the queue fills from iteration 0 and joins the codes from here on.
        inter_code_standardization: L_inter only; centre and scale each 3D prototype's scores over the
            rows entering Sinkhorn (queue + global batch) before the codes are computed (the prediction keeps
            the raw scores). Volume features share one dominant component, so their raw scores differ by
            less than epsilon and the codes are uniform without it (docs/pretraining.md, ablation).
        inter_codes: how L_inter's target codes are made: "sinkhorn" (SwAV: equal partition over queue +
            batch) or "centering" (DINO: softmax((s - c) / teacher_temperature_3d), c an EMA of the mean
            scores with momentum centering_momentum_3d; no queue, so no stale rows).
        teacher_temperature_3d, centering_momentum_3d: the "centering" codes (DINO: 0.04, 0.9).
        head_norm_3d: normalisation inside the 3D projection head: "layer" (LayerNorm, per sample) or
            "running_batch" (BatchNorm with running statistics in training too: centres the volume features
            across windows, which a batch of 2-4 windows cannot do by itself).
        deepcluster_heads: number of k-means heads (each with the 2D/3D K above); DC-v2 used 3.
        kmeans_iterations: spherical k-means iterations per recompute (DC-v2: 10).

    Dense term (ours; :mod:`nnssl_joint.ssl.dense`):
        lambda_dense: weight, 1.0 by default (0 = off, the paper). The loaders then also carry each view's
            coordinate maps.
        dense_stage: the encoder stage (skip) whose feature map the term acts on (0 = full resolution).
        dense_dim: output channels of the per-cell projection head (1x1 conv, ReLU, 1x1 conv).
        dense_temperature: InfoNCE temperature.
        dense_queries: at most this many query cells per direction and batch part (2D items, volume
            slices), drawn at random.
        dense_keys: 0 (default): every usable cell of the other view is a key (the positive and the
            negatives); K > 0: the negatives are a random K of them (torch's generator), the positive is
            still the nearest cell of the query's own row. Stage 1 has 9-18k keys per batch part.
        dense_slice_offset: volume windows only. 0: slice n of view A is paired with slice n of
            view B, as a 2D item's two views. D > 0 (default 2): with slice n + d of view B, d drawn per
            window uniformly from +-1..+-D (torch's generator), so the positive is the same in-plane position
            one to D slices away: a through-plane correspondence that 2D images cannot give.

    Contrastive volume term (ours; :mod:`nnssl_joint.ssl.volume_contrast`):
        lambda_volume_contrast: weight, 1.0 by default (0 = off, the paper). InfoNCE on the L2-normalised
            volume features Z of the two 3D views: the other view of the same window is the positive, the
            other windows of the batch (both views) and the queue are negatives, windows of the same case
        never. volume_contrast_temperature: InfoNCE temperature.
        volume_contrast_queue: length of the FIFO queue of earlier, detached Z (both views of every window
            of every training step, with their case numbers); 0 = in-batch negatives only.
        volume_contrast_momentum: 0: the keys are the online volume features themselves; m in
            (0, 1) (default 0.99): the keys (positives, in-batch negatives, the queue) come from a momentum
            copy of the encoder, g and f_inter, updated as m * copy + (1 - m) * online before every training
            forward (MoCo); without it the queue holds features of earlier weights (measured: collapse).

    Masked slice prediction:
        mask_ratio: fraction of slices masked per volume (at least one); paper 0.1.
        mask_target_normalization: "none" (the raw detached embeddings, as the paper) or "standardize"
            (per-feature standardisation over the valid slices of the global batch, so L_mask cannot fall by
            shrinking the embeddings or by predicting what every slice shares).
        mask_loss_all_positions: False = MSE on the masked slices only (BERT, ours); True = the
            authors' release, which averaged the masked MSE over all slices.

    Encoder statistics:
        norm_over_window: False (the paper) = every slice of a volume window is normalised by its
            own InstanceNorm statistics, like a 2D image; True = the encoder's InstanceNorms take their
            statistics over the valid slices of each window (2D images keep their own; padding slices keep
            theirs and do not enter the window's), as ``SliceWiseUNet3D`` with ``norm_over_volume`` does
            over a fine-tuning patch (twenty-second pass; the default). Same parameters either way.

    Gradient routing:
        volume_terms_train_encoder: True (default, the paper) = L_inter and L_mask reach f_intra and g
            through the slice tokens; False = f_inter reads detached slice embeddings, so L_inter and L_mask
            train f_inter, the mask decoder and the 3D head only, and f_intra / g learn from L_intra and
            L_intra_3d (session-4 ablation: L_inter is the term that collapses the slice embeddings).
        volume_encoder_gradient_scale: with ``volume_terms_train_encoder``, the factor on the volume terms'
            gradient where it enters the encoder (the slice tokens f_inter reads); 1.0 (the paper) =
            unchanged, 0.1 (default) = the encoder gets a tenth of it while f_inter and the heads get all of
            theirs (eighth pass: the whole gradient collapses the slice embeddings and, with them, Z).
        inter_trains_transformer: True (the paper) = L_inter's gradient reaches f_inter (and, with
            ``volume_terms_train_encoder``, the encoder) through Z; False = L_inter clusters a detached Z, so
            it trains the 3D projection head and the 3D prototypes only (default), and f_inter learns from
            L_mask and the contrastive volume term (eighth pass: L_inter's gradient is what collapses Z when
            the contrastive term spreads it).

    Release behaviour:
        slice_level_3d_loss: True (default) = the paper-intended slice-level loss between 3D views,
            which the authors' release lacked (False reproduces the release).
        intra_3d_slices_per_window: 0 (default) = L_intra_3d over every valid slice of every window (one
            Sinkhorn batch holds the N contiguous, nearly alike slices of each window); k > 0 = over k valid
            slices per window drawn at random (torch's generator; the same slice positions in both views;
            all of a window's valid slices when it has fewer), so the batch holds fewer near-duplicates
            (twenty-sixth pass).
        volume_view_shift: 0 (default) = the volume-level terms (L_inter, L_mask, the contrastive volume
            term) read both views over the whole window, slice n of view A against slice n of view B; s > 0 =
            each view's f_inter reads a sub-window of N - s consecutive window positions whose start is drawn
            per window and per view, uniformly from 0..s (torch's generator; clipped so that the sub-window
            holds a valid slice), so the two views' volume features differ along the slice axis by up to s
            slices. The per-slice terms (L_intra_3d, the dense term) and the window statistics keep the
            whole window. Must be < N (checked at the first volume batch). Not the paper's (issue 12's
            candidate "views that differ along the slice axis"; thirty-first pass).
        :meth:`authors_release` returns a config with the release's choices.
    """

    lambda_intra: float = 1.0
    lambda_intra_3d: float = 1.0
    lambda_inter: float = 1.0
    lambda_mask: float = 1.0
    lambda_varcov: float = 0.0
    varcov_target_std: float = 1.0
    varcov_covariance_weight: float = 0.04
    lambda_dense: float = 1.0
    dense_stage: int = 2
    dense_dim: int = 64
    dense_temperature: float = 0.2
    dense_queries: int = 1024
    dense_slice_offset: int = 2
    dense_keys: int = 0
    lambda_volume_contrast: float = 1.0
    volume_contrast_temperature: float = 0.2
    volume_contrast_queue: int = 128
    volume_contrast_momentum: float = 0.99

    schedule: str = "joint"
    stage_a_epochs: int = 100
    stage_b_epochs: int = 50
    staged_keep_intra: bool = True

    clustering: str = "swav"
    temperature: float = 0.1
    epsilon: float = 0.05
    epsilon_3d: float | None = None
    sinkhorn_iterations: int = 3
    num_prototypes_2d: int = 3000
    num_prototypes_3d: int = 64
    freeze_prototypes_iterations: int = 250
    queue_length_2d: int = 0
    queue_length_3d: int = 0
    queue_start_iteration: int = 1000
    inter_code_standardization: bool = False
    head_norm_3d: str = "layer"
    inter_codes: str = "sinkhorn"
    teacher_temperature_3d: float = 0.04
    centering_momentum_3d: float = 0.9
    deepcluster_heads: int = 3
    kmeans_iterations: int = 10

    mask_ratio: float = 0.1
    mask_loss_all_positions: bool = False
    mask_target_normalization: str = "none"
    slice_level_3d_loss: bool = True
    intra_3d_slices_per_window: int = 0
    volume_view_shift: int = 0
    volume_terms_train_encoder: bool = True
    volume_encoder_gradient_scale: float = 0.1
    inter_trains_transformer: bool = False
    norm_over_window: bool = True

    _CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {"schedule": SCHEDULES, "clustering": CLUSTERING_METHODS,
                                                      "head_norm_3d": HEAD_NORMS_3D,
                                                      "inter_codes": INTER_CODES,
                                                      "mask_target_normalization": MASK_TARGET_NORMALIZATIONS}
    _POSITIVE: ClassVar[tuple[str, ...]] = (
        "temperature",
        "epsilon",
        "sinkhorn_iterations",
        "num_prototypes_2d",
        "num_prototypes_3d",
        "deepcluster_heads",
        "kmeans_iterations",
        "teacher_temperature_3d",
        "varcov_target_std",
        "dense_dim",
        "dense_temperature",
        "dense_queries",
        "volume_contrast_temperature",
    )

    def __post_init__(self) -> None:
        self._validate_types()
        self._validate_values()

    @classmethod
    def paper(cls, **overrides: Any) -> ObjectiveConfig:
        """The paper's objective (:data:`PAPER_OBJECTIVE` over the defaults): the four terms, L_inter and
        L_mask trained through f_inter into the encoder, a 3D queue, per-slice statistics; the plugin's
        defaults before the twenty-third pass."""
        return cls.from_dict({**PAPER_OBJECTIVE, **overrides})

    @classmethod
    def authors_release(cls, **overrides: Any) -> ObjectiveConfig:
        """The behaviour of the authors' released code: the paper's objective (:meth:`paper`) with the staged
        schedule, masked MSE averaged over all slices, no slice-level loss between 3D views."""
        values: dict[str, Any] = {
            **PAPER_OBJECTIVE,
            "schedule": "staged",
            "mask_loss_all_positions": True,
            "slice_level_3d_loss": False,
        }
        values.update(overrides)
        return cls.from_dict(values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ObjectiveConfig:
        """Build from a mapping (e.g. JSON); missing keys take defaults, unknown keys raise."""
        valid = [f.name for f in dataclasses.fields(cls)]
        for key in data:
            if key not in valid:
                raise ValueError(f"unknown ObjectiveConfig key {key!r}; valid keys: {', '.join(valid)}.")
        return cls(**dict(data))

    def stage_at(self, epoch: int) -> StagePlan:
        """The loss terms, weights and freezing in effect at ``epoch`` (0-based)."""
        plan = self._clustering_stage_at(epoch)
        if self.lambda_volume_contrast > 0 and (self.schedule == "joint" or plan.name == "C"):
            plan = dataclasses.replace(plan, weights={**plan.weights,
                                                      TERM_VOLUME_CONTRAST: self.lambda_volume_contrast})
        extra = {term: weight for term, weight in ((TERM_VARCOV, self.lambda_varcov),
                                                   (TERM_DENSE, self.lambda_dense)) if weight > 0}
        if extra:
            return dataclasses.replace(plan, weights={**plan.weights, **extra})
        return plan

    def _clustering_stage_at(self, epoch: int) -> StagePlan:
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}.")
        intra = {TERM_INTRA: self.lambda_intra}
        if self.slice_level_3d_loss:
            intra[TERM_INTRA_3D] = self.lambda_intra_3d
        if self.schedule == "joint":
            return StagePlan(
                "joint", _active({**intra, TERM_INTER: self.lambda_inter, TERM_MASK: self.lambda_mask})
            )
        if epoch < self.stage_a_epochs:
            # Stage A is the authors' 2D pretraining on images and slices; no volume batches.
            return StagePlan("A", _active({TERM_INTRA: self.lambda_intra}))
        if epoch < self.stage_a_epochs + self.stage_b_epochs:
            return StagePlan("B", _active({TERM_MASK: self.lambda_mask}), freeze_intra=True)
        stage_c = {TERM_INTER: self.lambda_inter, **(intra if self.staged_keep_intra else {})}
        return StagePlan("C", _active(stage_c))

    def _validate_types(self) -> None:
        for spec in dataclasses.fields(self):
            value = getattr(self, spec.name)
            default = spec.default
            if default is None:  # optional float: None (the documented fallback) or a number
                if value is None:
                    continue
                if not isinstance(value, (int, float)) or isinstance(value, bool):
                    raise ValueError(f"ObjectiveConfig.{spec.name} must be a number or null, got {value!r}.")
                object.__setattr__(self, spec.name, float(value))
                continue
            if isinstance(default, bool):
                ok = isinstance(value, bool)
            elif isinstance(default, int):
                ok = isinstance(value, int) and not isinstance(value, bool)
            elif isinstance(default, float):
                ok = isinstance(value, (int, float)) and not isinstance(value, bool)
                if ok:
                    object.__setattr__(self, spec.name, float(value))
            else:
                ok = isinstance(value, type(default))
            if not ok:
                raise ValueError(
                    f"ObjectiveConfig.{spec.name} must be of type {type(default).__name__}, got {value!r}."
                )

    def _validate_values(self) -> None:
        for name, choices in self._CHOICES.items():
            if getattr(self, name) not in choices:
                raise ValueError(
                    f"ObjectiveConfig.{name} must be one of {choices}, got {getattr(self, name)!r}."
                )
        for name in ("lambda_intra", "lambda_intra_3d", "lambda_inter", "lambda_mask", "lambda_varcov",
                     "varcov_covariance_weight", "lambda_dense", "lambda_volume_contrast"):
            if getattr(self, name) < 0:
                raise ValueError(
                    f"ObjectiveConfig.{name} must be >= 0 (0 switches the term off), "
                    f"got {getattr(self, name)}."
                )
        for name in self._POSITIVE:
            if getattr(self, name) <= 0:
                raise ValueError(f"ObjectiveConfig.{name} must be > 0, got {getattr(self, name)}.")
        for name in (
            "stage_a_epochs",
            "stage_b_epochs",
            "freeze_prototypes_iterations",
            "queue_length_2d",
            "queue_length_3d",
            "queue_start_iteration",
            "dense_stage",
            "dense_slice_offset",
            "dense_keys",
            "intra_3d_slices_per_window",
            "volume_view_shift",
            "volume_contrast_queue",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"ObjectiveConfig.{name} must be >= 0, got {getattr(self, name)}.")
        if self.epsilon_3d is not None:
            if self.epsilon_3d <= 0:
                raise ValueError(f"ObjectiveConfig.epsilon_3d must be > 0 or null (null: epsilon, "
                                 f"{self.epsilon}), got {self.epsilon_3d}.")
            if self.clustering != "swav" or self.inter_codes != "sinkhorn":
                raise ValueError(
                    f"ObjectiveConfig.epsilon_3d={self.epsilon_3d} has no effect with clustering "
                    f"{self.clustering!r} and inter_codes {self.inter_codes!r}: only L_inter's Sinkhorn "
                    f"codes (clustering 'swav', inter_codes 'sinkhorn') use it; leave it null.")
        if not 0.0 <= self.volume_contrast_momentum < 1.0:
            raise ValueError(
                f"ObjectiveConfig.volume_contrast_momentum must lie in [0, 1) (0: no momentum key network; "
                f"MoCo: 0.999), got {self.volume_contrast_momentum}."
            )
        if not 0.0 <= self.centering_momentum_3d < 1.0:
            raise ValueError(
                f"ObjectiveConfig.centering_momentum_3d must lie in [0, 1) (DINO: 0.9), "
                f"got {self.centering_momentum_3d}."
            )
        if not 0.0 < self.volume_encoder_gradient_scale <= 1.0:
            raise ValueError(
                f"ObjectiveConfig.volume_encoder_gradient_scale must lie in (0, 1] (1: the whole gradient; "
                f"volume_terms_train_encoder: false cuts it), got {self.volume_encoder_gradient_scale}."
            )
        if not self.volume_terms_train_encoder and self.volume_encoder_gradient_scale != 1.0:
            raise ValueError(
                f"ObjectiveConfig.volume_encoder_gradient_scale={self.volume_encoder_gradient_scale} has no "
                f"effect with volume_terms_train_encoder: false (no volume gradient reaches the encoder); "
                f"leave it at 1.0 or set volume_terms_train_encoder: true."
            )
        if not 0.0 < self.mask_ratio < 1.0:
            raise ValueError(
                f"ObjectiveConfig.mask_ratio must lie in (0, 1) (paper: 0.1), got {self.mask_ratio}."
            )
        self._validate_schedule()

    def _validate_schedule(self) -> None:
        if self.schedule == "joint":
            if not self._clustering_stage_at(0).weights:
                raise ValueError(
                    "all loss weights are 0; set at least one of lambda_intra/lambda_inter/lambda_mask > 0."
                )
            return
        if self.stage_a_epochs > 0 and self.lambda_intra == 0:
            raise ValueError(
                "staged stage A trains only L_intra but lambda_intra is 0; "
                "set lambda_intra > 0 or stage_a_epochs = 0."
            )
        if self.stage_b_epochs > 0 and self.lambda_mask == 0:
            raise ValueError(
                "staged stage B trains only L_mask but lambda_mask is 0; "
                "set lambda_mask > 0 or stage_b_epochs = 0."
            )
        if not self._clustering_stage_at(self.stage_a_epochs + self.stage_b_epochs).weights:
            raise ValueError(
                "staged stage C has no active term; "
                "set lambda_inter > 0 (or staged_keep_intra with lambda_intra > 0)."
            )


def staged_stage_lengths(epochs: int) -> tuple[int, int]:
    """``(stage_a_epochs, stage_b_epochs)`` for a staged run of ``epochs`` epochs: 0.4 and 0.2 of them (ours;
    the authors report no lengths; the benchmark's staged arm), stage C at least one epoch."""
    if epochs >= 3:
        return round(0.4 * epochs), max(1, round(0.2 * epochs))
    return max(epochs - 1, 0), 0


def _active(weights: Mapping[str, float]) -> dict[str, float]:
    return {term: float(weight) for term, weight in weights.items() if weight > 0}


def combine_losses(terms: Mapping[str, Tensor | None], weights: Mapping[str, float] | StagePlan) -> Tensor:
    """Weighted sum of the active loss terms: sum over terms t with weight w_t > 0 of w_t * L_t.

    Terms that are inactive (weight missing or 0) or missing / ``None`` in ``terms`` (e.g. no volume
    in this batch) are skipped. Raises ValueError if nothing remains to optimise.
    """
    if isinstance(weights, StagePlan):
        weights = weights.weights
    total: Tensor | None = None
    for term, weight in weights.items():
        value = terms.get(term)
        if weight == 0 or value is None:
            continue
        total = weight * value if total is None else total + weight * value
    if total is None:
        raise ValueError(
            f"no active loss term to combine: active weights {dict(weights)}, computed terms "
            f"{sorted(t for t, v in terms.items() if v is not None)}."
        )
    return total
