"""The probe inside a pretraining run: the current encoder's linear-probe Dice and label-free diagnostics
per epoch, logged and plotted, so a run shows its representation-quality curve.

Configured by the ``probe`` section of the pretraining configuration (:class:`ProbeConfig`: ``target``,
``every_epochs``, ``configuration``, ``fit_cases``); off by default. The trainer calls
:func:`start_epoch_probe` when training starts (the target is loaded and checked against the run's
preset and channel count then, so a wrong target fails before the first epoch) and
:func:`run_epoch_probe` at every epoch end. Every epoch gets one entry per :data:`PROBE_LOG_KEYS` key
(NaN between probes), as nnU-Net's logger wants one value per epoch.

The probe runs on rank 0 with the network in eval mode and without gradients, restores the previous
train/eval mode, and saves and restores torch's (CPU and CUDA), NumPy's and Python's random states, so
the training's random stream and hence a seeded run's numbers are the same with and without it.
"""

from __future__ import annotations

import math
import time
from typing import Any

#: logger keys (one value per epoch, NaN where no probe ran) -> the probe's numbers they hold
PROBE_LOG_KEYS = {
    "probe_dice": ("dice", "logistic"),
    "probe_knn_dice": ("dice", "knn"),
    "probe_rankme_slices": ("diagnostics", "rankme_slices"),
    "probe_rankme_z": ("diagnostics", "rankme_z"),
    "probe_retrieval_top1": ("diagnostics", "retrieval_top1"),
    "probe_slice_position_r2": ("diagnostics", "slice_position_r2"),
    "probe_entropy_2d": ("diagnostics", "prototype_entropy_2d"),
    "probe_entropy_3d": ("diagnostics", "prototype_entropy_3d"),
    "probe_z_cosine": ("diagnostics", "z_mean_pairwise_cosine"),
}
_STATE = "_nnssl_joint_epoch_probe"


def probe_enabled(trainer: Any) -> bool:
    return (getattr(trainer.ssl_config, "probe", None) is not None
            and trainer.ssl_config.probe.target is not None)


def start_epoch_probe(trainer: Any) -> None:
    """Load and check the probe's target (rank 0, when configured)."""
    if not probe_enabled(trainer) or trainer.local_rank != 0:
        return
    from nnssl_joint.probe.data import load_target
    from nnssl_joint.probe.run import preserved_random_state
    from nnssl_joint.probe.weights import ProbeWeights, check_compatible

    cfg = trainer.ssl_config.probe
    start = time.perf_counter()
    with preserved_random_state():
        target = load_target(cfg.target, cfg.configuration, cfg.fit_cases, None, trainer.ssl_config.seed or 0)
    model = trainer.model
    check_compatible(ProbeWeights("run", "training", "this pretraining run", model.preset,
                                  trainer.num_input_channels, model.encoder), target.preset,
                     target.input_channels, target.dataset_name, target.plans_file)
    setattr(trainer, _STATE, target)
    trainer.print_to_log_file(
        f"probe: {target.dataset_name} ({cfg.configuration}) every {cfg.every_epochs} epoch(s), fit "
        f"{[c.identifier for c in target.fit]}, test {[c.identifier for c in target.test]} ({target.split}); "
        f"loaded in {time.perf_counter() - start:.1f} s")


def probe_model(model: Any, target: Any, resolved: dict[str, Any], seed: int = 0) -> dict[str, Any]:
    """The probe's numbers for a :class:`JointSSLModel` as it is now, leaving its mode and every random
    stream as they were."""
    import torch

    from nnssl_joint.common.modules import unwrap
    from nnssl_joint.probe.readout import ReadoutSettings
    from nnssl_joint.probe.run import preserved_random_state, probe_one
    from nnssl_joint.probe.weights import ProbeWeights

    net = unwrap(model)
    was_training = net.training
    weights = ProbeWeights("current", "training", "the current network", net.preset, 0, net.encoder,
                           net.slice_embedding, net.slice_transformer, net, dict(resolved))
    try:
        net.eval()
        with preserved_random_state(), torch.no_grad():
            from nnssl_joint.probe.diagnostics import window_settings

            n_slices, view_size = window_settings([weights], net.preset.encoder.total_stride)
            return probe_one(weights, target, n_slices, view_size,
                             ReadoutSettings(seed=seed, norm_slices=target.norm_slices))
    finally:
        net.train(was_training)


def run_epoch_probe(trainer: Any) -> None:
    """Log the probe's numbers for this epoch (NaN between probes) and a line in the training log."""
    if not probe_enabled(trainer) or trainer.local_rank != 0:
        return
    cfg = trainer.ssl_config.probe
    epoch = trainer.current_epoch
    due = (epoch + 1) % cfg.every_epochs == 0 or epoch == trainer.num_epochs - 1
    values = dict.fromkeys(PROBE_LOG_KEYS, math.nan)
    if due:
        if getattr(trainer, _STATE, None) is None:
            start_epoch_probe(trainer)
        resolved = (trainer.resolved.to_dict() if hasattr(trainer.resolved, "to_dict")
                    else dict(trainer.resolved))
        res = probe_model(trainer.model, getattr(trainer, _STATE), resolved, trainer.ssl_config.seed or 0)
        for key, (group, name) in PROBE_LOG_KEYS.items():
            value = res[group][name]["mean"] if group == "dice" else res[group].get(name)
            values[key] = math.nan if value is None else float(value)
        shown = ", ".join(f"{k[len('probe_'):]} {v:.3f}" for k, v in values.items() if not math.isnan(v))
        trainer.print_to_log_file(f"probe (epoch {epoch}): {shown} ({res['seconds']:.1f} s)")
    for key, value in values.items():
        trainer.logger.log(key, value, epoch)
