"""The weights a probe reads: every file a pretraining run leaves, or nnU-Net's from-scratch start.

``load_probe_weights(spec, ...)`` accepts

* a ``JointSSLPretrainTrainer`` run folder (its ``checkpoint_final.pth`` is read),
* a pretraining checkpoint (``checkpoint_final.pth`` / ``checkpoint_latest.pth``): the whole
  :class:`~nnssl_joint.pretrain.model.JointSSLModel`, heads and prototypes included,
* an exported downstream file (``pretrained_for_2d.pth``: f_intra; ``pretrained_for_3d_fullres.pth``
  or ``nnssl_joint export`` output: f_intra, g and f_inter),
* ``random``: the downstream network of the target's plans built as nnU-Net builds a from-scratch
  network (``get_network_from_plans(..., allow_init=True)``, which applies the network's
  ``initialize``, i.e. dynamic-network-architectures' ``InitWeights_He(1e-2)``), after
  ``torch.manual_seed(seed)``.

Every variant becomes a :class:`ProbeWeights`: the frozen parts in eval mode, plus what the file
holds for the label-free diagnostics (``None`` where it lacks them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nnssl_joint.errors import NnsslJointError
from nnssl_joint.models.preset import ArchitecturePreset

RANDOM = "random"


class ProbeWeightsError(NnsslJointError):
    """Weights that cannot be probed on the target as given (missing file, other preset or channels)."""


@dataclass
class ProbeWeights:
    """Frozen parts of one set of weights.

    ``encoder`` (f_intra, skips returned) always exists; ``slice_embedding`` (g) and
    ``slice_transformer`` (f_inter) when the file holds them; ``model`` is the whole
    :class:`JointSSLModel` of a pretraining checkpoint (projection heads, prototypes), else ``None``.
    """

    name: str
    kind: str
    source: str
    preset: ArchitecturePreset
    input_channels: int
    encoder: nn.Module
    slice_embedding: nn.Module | None = None
    slice_transformer: nn.Module | None = None
    model: nn.Module | None = None
    resolved: dict[str, Any] = field(default_factory=dict)
    seed: int | None = None

    def eval(self) -> ProbeWeights:
        for part in (self.encoder, self.slice_embedding, self.slice_transformer, self.model):
            if part is not None:
                part.eval()
        return self


def resolve_weights_path(spec: str | Path) -> Path:
    """The checkpoint file a weights argument names: a file as is, a run folder's ``checkpoint_final.pth``."""
    path = Path(spec).expanduser()
    if path.is_dir():
        final = path / "checkpoint_final.pth"
        if final.is_file():
            return final
        present = [p.name for p in sorted(path.glob("*.pth"))]
        hint = (f"; it holds {present}: pass one of them explicitly (e.g. {path / present[0]}) to probe an "
                "unfinished run" if present else "")
        raise ProbeWeightsError(
            f"run folder {path} has no checkpoint_final.pth: the pretraining has not finished. Finish it "
            f"(nnUNetv2_train ... --c continues it){hint}")
    if not path.is_file():
        raise ProbeWeightsError(
            f"weights {spec!r} do not exist: give a JointSSLPretrainTrainer run folder, "
            "its checkpoint_final.pth, a pretrained_for_2d.pth / pretrained_for_3d_fullres.pth, or 'random'")
    return path


def _stem_channels(state: dict[str, torch.Tensor]) -> int:
    from nnssl_joint.export import STEM_KEY_SUFFIXES

    for key, value in state.items():
        if key.startswith("encoder.") and key.endswith(STEM_KEY_SUFFIXES):
            return int(value.shape[1])
    raise ProbeWeightsError("the weights have no encoder stem (encoder.stages.0.0.convs.0.conv.weight); "
                            "they are not weights of a plugin network")


def _sub_state(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _from_downstream_file(path: Path, ckpt: dict[str, Any], name: str) -> ProbeWeights:
    from nnssl_joint.export import NORM_OVER_WINDOW_RECORD, RESCALE_RECORD, scale_encoder_blocks
    from nnssl_joint.models.encoder import build_encoder_2d, build_slice_embedding, build_slice_transformer
    from nnssl_joint.models.norms import use_volume_statistics

    meta = ckpt["nnssl_joint"]
    preset = ArchitecturePreset.from_dict(meta["preset"])
    state = ckpt["network_weights"]
    if meta.get(RESCALE_RECORD):  # the export's scale undone: the probe reads the encoder as pretrained
        state = scale_encoder_blocks(state, meta[RESCALE_RECORD], inverse=True)
    channels = _stem_channels(state)
    encoder = build_encoder_2d(preset, channels, return_skips=True)
    encoder.load_state_dict(_sub_state(state, "encoder."))
    if meta.get(NORM_OVER_WINDOW_RECORD):  # pretrained with window statistics: read windows with them
        use_volume_statistics(encoder)
    weights = ProbeWeights(name=name, kind=f"pretrained_for_{meta.get('configuration', 'unknown')}",
                           source=str(path), preset=preset, input_channels=channels, encoder=encoder)
    if any(k.startswith("slice_embedding.") for k in state):
        weights.slice_embedding = build_slice_embedding(preset)
        weights.slice_embedding.load_state_dict(_sub_state(state, "slice_embedding."))
    if any(k.startswith("slice_transformer.") for k in state):
        weights.slice_transformer = build_slice_transformer(preset)
        weights.slice_transformer.load_state_dict(_sub_state(state, "slice_transformer."))
    return weights.eval()


def load_weights_file(spec: str | Path, name: str | None = None) -> ProbeWeights:
    """A run folder, a pretraining checkpoint or an exported downstream file as :class:`ProbeWeights`."""
    from nnssl_joint.export import load_pretraining_checkpoint

    path = resolve_weights_path(spec)
    name = name or default_name(path)
    ckpt = load_pretraining_checkpoint(path)
    meta = ckpt["nnssl_joint"]
    if "config" in meta and any(k.startswith("intra_loss.") for k in ckpt["network_weights"]):
        from nnssl_joint.pretrain.checkpoint import load_pretraining_model

        model, meta = load_pretraining_model(path)
        return ProbeWeights(name=name, kind="checkpoint", source=str(path), preset=model.preset,
                            input_channels=int(meta["input_channels"]), encoder=model.encoder,
                            slice_embedding=model.slice_embedding, slice_transformer=model.slice_transformer,
                            model=model, resolved=dict(meta.get("resolved") or {})).eval()
    return _from_downstream_file(path, ckpt, name)


def default_name(path: Path) -> str:
    """A short label: the trainer folder's trainer name, plus the file stem unless it is checkpoint_final."""
    run = path.parent
    trainer_folder = run.parent.name if run.name.startswith("fold_") else run.name
    base = trainer_folder.split("__")[0]
    return base if path.name == "checkpoint_final.pth" else f"{base}/{path.stem}"


def distinct_names(specs: list[str]) -> list[tuple[str, str]]:
    """(name, path) per weights argument. ``NAME=PATH`` names it; otherwise the path parts that differ
    between the arguments (e.g. ``pretrain_joint``) are prefixed to :func:`default_name`."""
    pairs = [tuple(s.split("=", 1)) if "=" in s and not Path(s).exists() else (None, s) for s in specs]
    paths = [Path(p).expanduser().resolve() for _, p in pairs]
    common = 0
    if len(paths) > 1:
        while all(len(p.parts) > common + 1 and p.parts[common] == paths[0].parts[common] for p in paths):
            common += 1
    differ = len({p.parts[common] for p in paths if len(p.parts) > common}) > 1
    out, seen = [], {}
    for (name, spec), path in zip(pairs, paths):
        if name is None:
            base = default_name(path if path.suffix == ".pth" else path / "checkpoint_final.pth")
            differing = path.parts[common] if differ and path.parts[common] not in base else None
            name = f"{differing}:{base}" if differing else base
        seen[name] = seen.get(name, 0) + 1
        out.append((name if seen[name] == 1 else f"{name}#{seen[name]}", spec))
    return out


def random_weights(network_builder: Any, seed: int) -> ProbeWeights:
    """nnU-Net's from-scratch start: ``network_builder()`` (the target plans' network via
    ``get_network_from_plans(..., allow_init=True)``) after ``torch.manual_seed(seed)``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = network_builder()
    return ProbeWeights(name=f"{RANDOM}#{seed}", kind=RANDOM,
                        source=f"{RANDOM} (nnU-Net initialisation, seed {seed})",
                        preset=net.preset, input_channels=_stem_channels(net.state_dict()),
                        encoder=net.encoder,
                        slice_embedding=getattr(net, "slice_embedding", None),
                        slice_transformer=getattr(net, "slice_transformer", None), seed=seed).eval()


def check_compatible(weights: ProbeWeights, preset: ArchitecturePreset, input_channels: int, target: str,
                     plans_file: Path) -> None:
    """Fail with the fix when ``weights`` cannot run on the target as planned."""
    if weights.preset.to_dict()["encoder"] != preset.to_dict()["encoder"] or \
            weights.preset.embedding_dim != preset.embedding_dim:
        raise ProbeWeightsError(
            f"{weights.source} uses architecture preset '{weights.preset.name}' (encoder "
            f"{list(weights.preset.encoder.features_per_stage)}), but {plans_file} plans {target} "
            f"with preset '{preset.name}' ({list(preset.encoder.features_per_stage)}). "
            "Re-plan the target with the weights' preset: nnssl_joint plan_and_preprocess "
            f"-d {target} --downstream --preset {weights.preset.name}")
    if weights.input_channels != input_channels:
        raise ProbeWeightsError(
            f"{weights.source} was pretrained on {weights.input_channels} input channel(s), "
            f"target {target} has "
            f"{input_channels}. Export weights with an adapted stem and probe that file: nnssl_joint export "
            f"--checkpoint {weights.source} -d {target} -c 3d_fullres -o adapted.pth")
