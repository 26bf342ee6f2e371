"""Rebuild the pretraining network from a ``JointSSLPretrainTrainer`` checkpoint.

A checkpoint's ``nnssl_joint`` record holds the user's configuration (``config``, with its ``"auto"``
values), the self-configuration (``resolved``, :class:`SelfConfiguration`), the preset and the channel
count; the network's sizes come from the self-configuration, as in the trainer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nnssl_joint.models.preset import ArchitecturePreset
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
