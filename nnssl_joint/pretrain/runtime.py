"""Helpers of JointSSLPretrainTrainer that hold no nnU-Net trainer state: dataset statistics,
applying the self-configuration, optimiser groups, batch handling, epoch summaries, RNG capture,
resume checks and the export of downstream weights. Kept here so the trainer file stays thin."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import distributed as dist
from torch import nn

from nnssl_joint.common.modules import unwrap
from nnssl_joint.errors import NnsslJointError
from nnssl_joint.models.preset import same_preset
from nnssl_joint.pretrain.autoconfig import DatasetStats, SelfConfiguration
from nnssl_joint.ssl.objective import LOSS_TERMS
from nnssl_joint.ssl.swav import prototype_usage_entropy

#: top-level modules of :class:`~nnssl_joint.pretrain.model.JointSSLModel` that only the volume terms train:
#: f_inter, the 3D projection head, the 3D prototypes (or centroids), the masked-slice decoder
VOLUME_PARTS = ("slice_transformer", "projection_3d", "inter_loss", "masked_modeling")


#: the parts of :data:`VOLUME_PARTS` that ``optim.volume_head_lr_factor`` sets apart: the 3D projection head
#: and the 3D prototypes (or centroids), all that L_inter trains when ``objective.inter_trains_transformer``
#: is false
VOLUME_HEAD_PARTS = ("projection_3d", "inter_loss")


def parameter_groups(network: nn.Module, weight_decay: float, volume_lr_factor: float = 1.0,
                     volume_head_lr_factor: float | None = None) -> list[dict[str, Any]]:
    """No weight decay on norms, biases, the mask token and prototypes (unit vectors anyway). Every group
    carries ``lr_factor``, its learning rate relative to the base rate: with ``volume_lr_factor`` != 1 the
    :data:`VOLUME_PARTS` get groups of their own at that factor (with 1: two groups, as before the key
    existed, so earlier checkpoints resume); ``volume_head_lr_factor`` (None: ``volume_lr_factor``) sets the
    rate of :data:`VOLUME_HEAD_PARTS`. One pair of groups (decay, no decay) per distinct factor, the base
    rate's first, so the groups of a configuration without the second key are those it had before."""
    head_factor = volume_lr_factor if volume_head_lr_factor is None else volume_head_lr_factor
    for key, value in (("volume_lr_factor", volume_lr_factor), ("volume_head_lr_factor", head_factor)):
        if not value > 0:
            raise ValueError(f"optim.{key} must be > 0, got {value!r}")
    factors = list(dict.fromkeys((1.0, volume_lr_factor, head_factor)))
    groups: dict[tuple[float, bool], list[nn.Parameter]] = {}
    for name, p in unwrap(network).named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim <= 1 or "prototypes" in name or "mask_token" in name
        part = name.split(".", 1)[0]
        factor = (head_factor if part in VOLUME_HEAD_PARTS
                  else volume_lr_factor if part in VOLUME_PARTS else 1.0)
        groups.setdefault((factor, no_decay), []).append(p)
    return [{"params": groups.get((factor, no_decay), []), "weight_decay": 0.0 if no_decay else weight_decay,
             "lr_factor": factor} for factor in factors for no_decay in (False, True)]


def gradient_parts(network: nn.Module) -> list[tuple[str, list[nn.Parameter]]]:
    """The parts ``optim.grad_clip_mode: per_part`` clips separately: every top-level module of the
    (unwrapped) network with trainable parameters, plus the network's own direct parameters if any."""
    model = unwrap(network)
    parts = [(name, [p for p in child.parameters() if p.requires_grad])
             for name, child in model.named_children()]
    parts.append(("", [p for p in model.parameters(recurse=False) if p.requires_grad]))
    return [(name, params) for name, params in parts if params]


def clip_gradients(network: nn.Module, max_norm: float, mode: str = "global") -> None:
    """Clips the gradients to ``max_norm``: one norm over all parameters (``global``) or one per part of
    :func:`gradient_parts` (``per_part``). Under DDP the gradients are already averaged, so every process
    clips by the same factors."""
    if mode == "global":
        torch.nn.utils.clip_grad_norm_(unwrap(network).parameters(), max_norm)
    elif mode == "per_part":
        for _, params in gradient_parts(network):
            torch.nn.utils.clip_grad_norm_(params, max_norm)
    else:
        raise ValueError(f"grad_clip_mode must be 'global' or 'per_part', got {mode!r}")


def batch_to_device(batch: dict, device: torch.device) -> tuple[dict | None, dict | None]:
    def move(d: dict | None) -> dict | None:
        if d is None:
            return None
        return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in d.items()}

    return move(batch.get("slices")), move(batch.get("volumes"))


def count_slices(slices: dict | None, volumes: dict | None) -> int:
    """Slice passes through f_intra in this step (all views)."""
    n = 0
    if slices is not None:
        n += slices["global_views"].shape[0] * slices["global_views"].shape[1]
        if slices.get("small_views") is not None:
            n += slices["small_views"].shape[0] * slices["small_views"].shape[1]
    if volumes is not None:
        b, v, _, s = volumes["views"].shape[:4]
        n += b * v * s
    return int(n)


def batch_case_ids(batch: dict) -> list[str]:
    ids: list[str] = []
    for part in ("slices", "volumes"):
        if batch.get(part) is not None:
            ids += [str(k) for k in batch[part].get("keys", [])]
    return ids


def _gather_list(values: list, is_ddp: bool) -> list:
    if not is_ddp:
        return values
    gathered: list[list] = [None] * dist.get_world_size()  # type: ignore[list-item]
    dist.all_gather_object(gathered, values)
    return [v for part in gathered for v in part]


def summarize_epoch(outputs: list[dict], model: nn.Module, seconds: float, is_ddp: bool) -> dict[str, float]:
    """Per-epoch means of every loss term over finite steps, throughput, prototype-usage entropy."""
    finite = [o for o in outputs if o["finite"]]
    summary: dict[str, float] = {}
    losses = _gather_list([o["loss"] for o in finite], is_ddp)
    summary["train_losses"] = float(np.mean(losses)) if losses else float("nan")
    for term in LOSS_TERMS:
        values = _gather_list([o[term] for o in finite if term in o], is_ddp)
        summary[f"loss_{term}"] = float(np.mean(values)) if values else float("nan")
    slices = sum(_gather_list([o["n_slices"] for o in outputs], is_ddp))
    volumes = sum(_gather_list([o["n_volumes"] for o in outputs], is_ddp))
    summary["slices_per_s"] = slices / seconds
    summary["volumes_per_s"] = volumes / seconds
    summary["nonfinite_steps"] = float(sum(_gather_list([0 if o["finite"] else 1 for o in outputs], is_ddp)))
    for key, loss in (("2d", model.intra_loss), ("3d", model.inter_loss)):
        assigned = _gather_list([o[f"_assign_{key}"] for o in finite if f"_assign_{key}" in o], is_ddp)
        if assigned:
            idx = torch.from_numpy(np.concatenate(assigned)).long()
            one_hot = torch.nn.functional.one_hot(idx, loss.prototypes.weight.shape[0]).float()
            summary[f"entropy_{key}"] = abs(prototype_usage_entropy(one_hot))  # not -0.0 when one is used
        else:
            summary[f"entropy_{key}"] = float("nan")
        # the entropy of a few samples over many prototypes says nothing about collapse
        summary[f"entropy_{key}_samples"] = float(sum(len(a) for a in assigned))
    return summary


#: a SwAV term whose epoch mean lies within this fraction of log K carries no clustering signal: with
#: uniform Sinkhorn codes the cross-entropy is log K exactly when the predictions are uniform as well
UNIFORM_CODES_TOLERANCE = 0.01


def monitor_warnings(summary: dict[str, float], epoch: int, num_prototypes: dict[str, int],
                     entropy_threshold: float, swav: bool,
                     previous: dict[str, float] | None = None) -> list[str]:
    """The collapse monitor's warnings for one epoch's ``summarize_epoch`` output (from the second epoch on).

    * *collapse*: a prototype-usage entropy below ``entropy_threshold`` with at least 4 samples per
      prototype (few prototypes take all samples);
    * *uniform codes* (SwAV only): L_intra / L_intra_3d within ``UNIFORM_CODES_TOLERANCE`` of log K_2D, or
      L_inter of log K_3D, in this epoch and in the ``previous`` one (the losses of the epoch before; a
      term on its way down passes through log K in one epoch, e.g. L_intra from 1.02 to 0.98 log K_2D early
      on). Then codes and predictions are both uniform: the entropies look healthy while nothing is
      learned (e.g. 8 windows per 3D batch with the default head, docs/pretraining.md).
    ``num_prototypes``: ``{"2d": K_2D, "3d": K_3D}``."""
    if epoch < 1:
        return []
    warnings = []
    for key in ("2d", "3d"):
        value, samples = summary[f"entropy_{key}"], summary[f"entropy_{key}_samples"]
        if samples >= 4 * num_prototypes[key] and value < entropy_threshold:
            warnings.append(f"WARNING: possible cluster collapse: entropy_{key} = {value:.3f} < "
                            f"{entropy_threshold} (few prototypes take all samples). Consider a larger "
                            "batch, fewer prototypes, a larger epsilon or a longer prototype freeze.")
    if swav and previous is not None:
        for term, key in (("intra", "2d"), ("intra_3d", "2d"), ("inter", "3d")):
            value, log_k = summary[f"loss_{term}"], float(np.log(num_prototypes[key]))
            before = previous.get(f"loss_{term}", float("nan"))
            if all(np.isfinite(v) and abs(v / log_k - 1) < UNIFORM_CODES_TOLERANCE for v in (value, before)):
                k = f"K_{key.upper()}"
                warnings.append(
                    f"WARNING: no clustering signal: L_{term} = {value:.4f} = {value / log_k:.3f} log {k} "
                    f"({k} = {num_prototypes[key]}) in this epoch and the one before: the Sinkhorn codes and "
                    "the predictions are uniform, so the entropies look healthy while the term learns "
                    "nothing. In the first epochs (frozen prototypes) this can pass; if it persists, "
                    "consider a smaller epsilon (objective.epsilon_3d for L_inter alone), a normalised "
                    "input (transformer.input_norm batch for "
                    "L_inter) or fewer samples per batch.")
    return warnings


def augmenter_seeds(num_processes: int) -> list[int]:
    """Distinct seeds for the augmentation worker processes, drawn from NumPy's global RNG (seeded by
    :func:`nnssl_joint.common.seeding.seed_everything` or restored from a checkpoint)."""
    first = int(np.random.randint(0, 2**31 - 1 - num_processes))
    return [first + i for i in range(num_processes)]


def snapshot_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the model's buffers (SwAV feature queues and their pointers), taken before a step.

    Buffers the forward pass never writes (``model.buffers_not_written_by_forward``: the DeepCluster-v2
    memory banks, centroids and pseudo-labels, which can be large) are not copied."""
    skip = tuple(getattr(model, "buffers_not_written_by_forward", ()))
    return {name: buf.detach().clone() for name, buf in model.named_buffers()
            if not (skip and name.startswith(skip))}


def restore_buffers(model: nn.Module, snapshot: dict[str, torch.Tensor]) -> None:
    """Undo what a skipped step's forward pass wrote into the buffers (e.g. NaN embeddings pushed into a
    queue, which would make every later loss NaN)."""
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name in snapshot:
                buf.copy_(snapshot[name])


#: temporary files of atomic writes (nnssl_joint.common.checkpoint_io: ".<name>.<random>.tmp") and of the
#: progress plot, left behind when a run is killed while writing
_STALE_TEMP = re.compile(r"^\.((checkpoint_\w+|pretrained_for_\w+)\.pth|nnssl_joint_config\.json|losses\.tsv)"
                         r"\.\w+\.tmp$|^\.progress\.png\.tmp\.png$")


def remove_stale_temp_files(folder: str | Path) -> list[str]:
    """Delete the temporary files a killed run left in its output folder; returns their names.

    They are never read (nnU-Net resumes from the exact names checkpoint_final/latest/best.pth, which
    are only ever replaced by a rename of a complete file)."""
    folder = Path(folder)
    removed = []
    if folder.is_dir():
        for path in sorted(folder.iterdir()):
            if _STALE_TEMP.match(path.name) and path.is_file():
                path.unlink(missing_ok=True)
                removed.append(path.name)
    return removed


def newest_training_state(filename: str, device: torch.device | str = "cpu") -> tuple[str, dict]:
    """The checkpoint ``--c`` should resume from, loaded: ``filename``, or ``checkpoint_best.pth`` next to it
    when nnU-Net picked ``checkpoint_latest.pth`` and the best one is newer. Both hold the full training
    state; the best one is written whenever the epoch loss improves, so with ``save_every`` > 1 it is
    often the newer one, and resuming from latest would redo epochs that were already saved."""
    path = Path(filename)
    candidates = [path]
    if path.name == "checkpoint_latest.pth" and (path.parent / "checkpoint_best.pth").is_file():
        candidates.append(path.parent / "checkpoint_best.pth")
    newest, newest_key = None, None
    for candidate in candidates:
        checkpoint = torch.load(candidate, map_location=device, weights_only=False)
        key = (checkpoint.get("current_epoch", -1), checkpoint.get("nnssl_joint", {}).get("iteration", -1))
        if newest is None or key > newest_key:
            newest, newest_key = (str(candidate), checkpoint), key
    return newest


def check_resume_compatible(checkpoint: dict, current: dict) -> dict:
    """The checkpoint must come from this trainer with the same preset and resolved configuration."""
    extra = checkpoint.get("nnssl_joint")
    if extra is None:
        raise NnsslJointError(
            f"the checkpoint was written by {checkpoint.get('trainer_name', 'an unknown trainer')}, not by "
            "JointSSLPretrainTrainer; --c can only resume a JointSSLPretrainTrainer run "
            "(remove --c to start anew)")
    if not same_preset(extra["preset"], current["preset"]):
        raise NnsslJointError(
            f"the checkpoint used architecture preset '{extra['preset']['name']}' but this run resolves to "
            f"'{current['preset']['name']}'; resume with the same NNSSL_JOINT_CONFIG/plans, "
            "or start a new run")
    old_clustering = extra.get("config", {}).get("objective", {}).get("clustering", "swav")
    new_clustering = current.get("config", {}).get("objective", {}).get("clustering", "swav")
    if old_clustering != new_clustering:
        raise NnsslJointError(
            f"the checkpoint was trained with objective.clustering={old_clustering!r} but this run sets "
            f"{new_clustering!r}; their clustering state differs (prototypes and queues vs. memory banks and "
            "k-means centroids). Resume with the same value or start a new run")
    old_config, new_config = extra.get("config", {}), current.get("config", {})
    if "init_from" in old_config and old_config["init_from"] != new_config.get("init_from"):
        raise NnsslJointError(
            f"the checkpoint's run started from init_from={old_config['init_from']!r} but this run sets "
            f"init_from={new_config.get('init_from')!r}; init_from is read only at a fresh start, so --c "
            f"would ignore the new value. Resume with init_from={old_config['init_from']!r} (the file need "
            "not exist any more) or start a new run without --c")
    changed_objective = _changed_training_keys(old_config, new_config)
    if changed_objective:
        raise NnsslJointError(
            f"the checkpoint was trained with another objective or optimiser than this run resolves to (old, "
            f"new): {changed_objective}; resume with the checkpoint's values (set them in the file named by "
            "NNSSL_JOINT_CONFIG; for a run started before the defaults changed in the twenty-third pass, "
            "plans/pretrain/paper.json holds the old defaults) or start a new run")
    old, new = extra["resolved"], current["resolved"]
    changed = {k: (old.get(k), new.get(k)) for k in ("view_size", "n_slices", "num_prototypes_2d",
                                                      "num_prototypes_3d") if old.get(k) != new.get(k)}
    if changed:
        raise NnsslJointError(
            f"the run's self-configuration changed since the checkpoint (old, new): {changed}; "
            "resume with the same configuration (pin these values in the file named by "
            "NNSSL_JOINT_CONFIG) or start a new run")
    return extra


#: optimiser keys that shape the optimiser's parameter groups or the clipping: a resume must keep them
RESUME_OPTIM_KEYS = ("grad_clip_mode", "volume_lr_factor", "volume_head_lr_factor")


def _changed_training_keys(old: dict, new: dict) -> dict[str, tuple[Any, Any]]:
    """Objective keys and :data:`RESUME_OPTIM_KEYS` whose values differ between a checkpoint's configuration
    (``old``) and this run's (``new``), as ``{"objective.key": (old, new)}``. A key a checkpoint does not
    record (written before the key existed) had its default of then: the paper's value
    (:data:`PAPER_OBJECTIVE`, :data:`PAPER_OPTIM`) where the defaults changed since, else it is not
    compared."""
    from nnssl_joint.pretrain.config import PAPER_OPTIM
    from nnssl_joint.ssl.objective import PAPER_OBJECTIVE

    changed: dict[str, tuple[Any, Any]] = {}
    sections = (("objective", None, PAPER_OBJECTIVE), ("optim", RESUME_OPTIM_KEYS, PAPER_OPTIM))
    for section, keys, then in sections:
        before = {**then, **old.get(section, {})}
        after = new.get(section, {})
        for key in (keys if keys is not None else sorted(set(before) | set(after))):
            if key in before and key in after and before[key] != after[key]:
                changed[f"{section}.{key}"] = (before[key], after[key])
    return changed


def export_downstream_weights(trainer: Any, final_checkpoint: str) -> list[str]:
    """Files next to checkpoint_final.pth that nnU-Net's stock -pretrained_weights loads into the
    plugin's 2d / 3d_fullres networks (same preset and channel count)."""
    from nnssl_joint.export import export_for_presets

    return [str(p) for p in export_for_presets(final_checkpoint, trainer.output_folder)]


def dataset_stats(folder: str, dataset_class: Any) -> tuple[DatasetStats, dict]:
    """Statistics for the self-configuration and the summary the loaders reuse."""
    from nnssl_joint.data.loaders import dataset_summary

    summary = dataset_summary(dataset_class(folder))
    shapes = [(c["n_slices"], *c["shape_in_plane"]) for c in summary["cases"].values()]
    return DatasetStats.from_shapes(shapes), summary


def sample_index(summary: dict, n_slices: int) -> Any:
    """Global sample indices of the dataset (all cases of the summary, sorted) for DeepCluster-v2's memory
    banks: :class:`nnssl_joint.data.loaders.SampleIndex`."""
    from nnssl_joint.data.loaders import SampleIndex

    return SampleIndex.from_summary(summary, n_slices)


def check_sample_index(checkpoint_index: dict | None, current: Any) -> None:
    """A DeepCluster-v2 checkpoint's memory banks are keyed by its sample index: refuse another one."""
    if checkpoint_index is None:
        raise NnsslJointError("the checkpoint holds no sample index (record 'sample_index'), so its "
                              "DeepCluster-v2 memory banks cannot be matched to this dataset; "
                              "start a new run")
    if checkpoint_index != current.to_dict():
        old, new = checkpoint_index.get("slices_per_case", {}), current.to_dict()["slices_per_case"]
        changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        raise NnsslJointError(
            f"the dataset's cases or window length changed since the checkpoint (n_slices "
            f"{checkpoint_index.get('n_slices')} -> {current.n_slices}; cases added, removed or of another "
            f"slice count: {changed[:5]}{' ...' if len(changed) > 5 else ''}): the DeepCluster-v2 memory "
            "banks are keyed by (case, slice) and (case, window start), so the run cannot resume on this "
            "data; start a new run")


def build_joint_loader(trainer: Any, resolved: SelfConfiguration) -> Any:
    """nnU-Net dataset of all training cases -> JointLoader (2D views + volume windows) drawing this
    process's share of the global batches (``resolved.for_process``); with the trainer's ``sample_index``
    the batches carry global sample indices (for DeepCluster-v2; they draw no random numbers)."""
    from nnssl_joint.data.augment import STRONG, WEAK
    from nnssl_joint.data.loaders import (
        JointLoader,
        SliceViewsLoader,
        VolumeViewsLoader,
        case_sampling_probabilities,
    )

    data = trainer.ssl_config.data
    dataset_tr, _ = trainer.get_tr_and_val_datasets()
    summary = trainer.dataset_summary
    slices_per_case = {k: summary["cases"][k]["n_slices"] for k in dataset_tr.identifiers}
    probabilities = case_sampling_probabilities(dataset_tr, slices_per_case, data.min_2d_fraction)
    view = (resolved.view_size,) * 2
    strengths = {"weak": WEAK, "strong": STRONG}
    if data.augmentation not in strengths:
        raise NnsslJointError(f"data.augmentation must be one of {sorted(strengths)}, "
                              f"got {data.augmentation!r}")
    augmentation = strengths[data.augmentation]
    index = getattr(trainer, "sample_index", None)
    coordinates = trainer.ssl_config.objective.lambda_dense > 0  # the dense term reads them
    slice_loader = SliceViewsLoader(dataset_tr, resolved.batch_size_2d_per_rank, view, config=augmentation,
                                    n_small_views=resolved.n_small_views,
                                    small_view_size=(resolved.small_view_size,) * 2,
                                    sampling_probabilities=probabilities, sample_index=index,
                                    coordinates=coordinates)
    volume_loader = None
    if resolved.batch_size_3d_per_rank > 0 and any(n >= 2 for n in slices_per_case.values()):
        volume_loader = VolumeViewsLoader(dataset_tr, resolved.batch_size_3d_per_rank, resolved.n_slices,
                                          view, config=augmentation,
                                          summary={"cases": {k: summary["cases"][k]
                                                             for k in dataset_tr.identifiers}},
                                          sample_index=index, coordinates=coordinates)
    return JointLoader(slice_loader, volume_loader)
