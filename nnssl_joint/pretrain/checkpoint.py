"""Rebuild the pretraining network from a ``JointSSLPretrainTrainer`` checkpoint.

A checkpoint's ``nnssl_joint`` record holds the user's configuration (``config``, with its ``"auto"``
values), the self-configuration (``resolved``, :class:`SelfConfiguration`), the preset and the channel
count; the network's sizes come from the self-configuration, as in the trainer.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from nnssl_joint.models.preset import ArchitecturePreset, same_preset
from nnssl_joint.pretrain.autoconfig import SelfConfiguration
from nnssl_joint.pretrain.model import JointSSLModel
from nnssl_joint.ssl.objective import ObjectiveConfig


def model_from_record(record: dict[str, Any]) -> JointSSLModel:
    """An untrained :class:`JointSSLModel` shaped like the run that wrote ``record``
    (``ckpt["nnssl_joint"]``)."""
    objective = SelfConfiguration.from_dict(record["resolved"]).objective(
        ObjectiveConfig.from_dict(record["config"]["objective"]))
    return JointSSLModel(ArchitecturePreset.from_dict(record["preset"]), int(record["input_channels"]),
                         objective)


def load_pretraining_model(checkpoint_file: str | Path) -> tuple[JointSSLModel, dict[str, Any]]:
    """The pretraining network of ``checkpoint_file`` with its weights, in eval mode, and its record."""
    # checks the file, with messages naming the fix
    from nnssl_joint.export import load_pretraining_checkpoint

    ckpt = load_pretraining_checkpoint(checkpoint_file)
    record = ckpt["nnssl_joint"]
    model = model_from_record(record)
    model.load_state_dict(ckpt["network_weights"])
    model.eval()
    return model, record


def _run_state_prefixes(model: JointSSLModel) -> list[str]:
    """State-dict prefixes of the modules whose tensors are a run's own state, not weights: queues of earlier
    embeddings, DeepCluster-v2's memory banks and k-means results (indexed by the source run's samples), and
    the momentum key network (copied from the loaded online network instead)."""
    from nnssl_joint.ssl.deepcluster import DeepClusterV2Loss, MemoryBank
    from nnssl_joint.ssl.queue import FeatureQueue

    prefixes = [f"{name}." for name, module in model.named_modules()
                if name and isinstance(module, (FeatureQueue, MemoryBank, DeepClusterV2Loss))]
    if model.volume_key_network is not None:
        prefixes.append("volume_key_network.")
    return prefixes


def _parts(names: Iterable[str]) -> list[str]:
    return sorted({name.split(".")[0] for name in names})


def load_initial_weights(model: JointSSLModel, checkpoint_file: str | Path, preset: ArchitecturePreset,
                         input_channels: int) -> dict[str, Any]:
    """Start ``model`` (a fresh pretraining network) from the weights of another pretraining run
    (``init_from``): every tensor whose name and shape match, except the run state of
    :func:`_run_state_prefixes`; the momentum key network, if any, becomes a copy of the loaded online
    network. Refuses a checkpoint of another preset or channel count, a tensor of another shape, and a file
    with none of the encoder's tensors. Returns what was loaded (``loaded``: count; ``own_draw``: parts left
    at this run's draw; ``unused``: parts of the file this network lacks)."""
    from nnssl_joint.errors import NnsslJointError
    from nnssl_joint.export import load_pretraining_checkpoint

    hint = "set init_from to checkpoint_final.pth of a JointSSLPretrainTrainer run of the same preset"
    try:  # the export's checks of the file (missing, unreadable, not the plugin's), said as init_from's
        ckpt = load_pretraining_checkpoint(checkpoint_file)
    except NnsslJointError as e:
        raise NnsslJointError(f"init_from: {e}; {hint}, or to null") from e
    record = ckpt["nnssl_joint"]
    if not same_preset(record["preset"], preset.to_dict()):
        raise NnsslJointError(f"init_from: {checkpoint_file} was pretrained with preset "
                              f"'{record['preset'].get('name')}', this run uses '{preset.name}' (or a "
                              f"changed copy of it); {hint}")
    if int(record.get("input_channels", -1)) != input_channels:
        raise NnsslJointError(f"init_from: {checkpoint_file} has {record.get('input_channels')} input "
                              f"channel(s), this dataset {input_channels}; {hint}")
    source = ckpt["network_weights"]
    target = model.state_dict()
    skip = tuple(_run_state_prefixes(model))
    wanted = [name for name in target if not name.startswith(skip)]
    shared = [name for name in wanted if name in source]
    wrong = [f"{name} {tuple(source[name].shape)} in the file, {tuple(target[name].shape)} here"
             for name in shared if source[name].shape != target[name].shape]
    if wrong:
        raise NnsslJointError(
            f"init_from: {len(wrong)} tensor(s) of {checkpoint_file} differ in shape from this run's "
            f"network: {'; '.join(wrong[:5])}. Prototype counts follow the data unless set: give "
            "objective.num_prototypes_2d / num_prototypes_3d the values of the file's run "
            "(its nnssl_joint_config.json, 'resolved')")
    if not any(name.startswith("encoder.") for name in shared):
        raise NnsslJointError(f"init_from: {checkpoint_file} holds none of the pretraining network's encoder "
                              f"tensors (an exported file?); {hint}")
    model.load_state_dict({**target, **{name: source[name] for name in shared}})
    keys = model.volume_key_network
    if keys is not None:
        for part in keys:
            keys[part].load_state_dict(getattr(model, part).state_dict())
    return {"loaded": len(shared), "own_draw": _parts(set(wanted) - set(shared)),
            "unused": _parts(set(source) - set(target))}
