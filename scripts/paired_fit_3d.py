"""Paired fitting screen (issue 16): several 3D networks trained on the very same sequence of nnU-Net batches.

nnU-Net's own training pipeline (``nnUNetTrainer.get_dataloaders`` of the stock plans: patch sampling,
foreground oversampling, augmentation) draws ``--steps`` batches once, from ``--data-seed``; every network
then trains on that sequence with nnU-Net's loss (DC + CE, ``batch_dice`` from the plans, deep supervision
with its own plans' strides and nnU-Net's weights), nnU-Net's SGD (lr 1e-2, momentum 0.99, Nesterov, weight
decay 3e-5, gradient norm clipped at 12) and a per-step poly decay, without warm-up, one thread. So
differences come from the networks alone, not from the data draw, the trainer or the schedule. Every
``--every`` steps it prints the mean training loss and the hard Dice per class on the fold's training and
validation cases (a forward pass over the first patch-size crop of each preprocessed case, zero-padded;
meant for tasks whose cases fit one patch, such as the demo's 32^3 task).

    python scripts/paired_fit_3d.py --preprocessed PRE -d 503 --fold 0 --steps 500 \\
        --network stock=PRE/Dataset503_SynthOrgans/nnUNetPlans.json \\
        --network plugin=PLUGIN/Dataset503_SynthOrgans/nnsslJointPlans.json \\
        --network 'nopool=PLUGIN/Dataset503_SynthOrgans/nnsslJointPlans.json@{"pool_slices_from_stage": null}'

PRE: an nnU-Net preprocessed folder holding the target's nnUNetPlans (plans, 3d_fullres data and
splits_final.json), e.g. ``nnssl_joint benchmark --arms nnunet``'s ``preprocessed/``. ``--network
NAME=PLANS[@JSON]``: the plans file whose 3d_fullres architecture to build, plus arch_kwargs to override.
Prints one JSON line per network.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch


def _parse_network(text: str) -> tuple[str, Path, dict]:
    name, _, rest = text.partition("=")
    plans, _, extra = rest.partition("@")
    if not name or not plans:
        raise SystemExit(f"--network {text!r}: expected NAME=PLANS.json[@JSON]")
    return name, Path(plans), json.loads(extra) if extra else {}


def _load_cases(folder: Path, keys: list[str], patch: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    dataset = infer_dataset_class(str(folder))(str(folder), keys)
    xs, ys = [], []
    for key in keys:
        data, seg, _, _ = dataset.load_case(key)
        data, seg = np.asarray(data), np.asarray(seg)
        pad = [(0, 0)] + [(0, max(0, p - n)) for p, n in zip(patch, data.shape[1:])]
        crop = (slice(None), *(slice(0, p) for p in patch))
        xs.append(np.pad(data, pad)[crop])
        ys.append(np.pad(seg, pad)[crop])
    return torch.from_numpy(np.stack(xs)).float(), torch.from_numpy(np.stack(ys)).long().clamp(min=0)


def hard_dice(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, labels: list[int]) -> list[float]:
    """Hard Dice per label of ``net``'s full-resolution output on the batch (pooled over its cases)."""
    from nnssl_joint.experiments.pipeline import dice_per_class

    net.eval()
    with torch.no_grad():
        out = net(x)
        pred = (out[0] if isinstance(out, (list, tuple)) else out).argmax(1)
    scores = dice_per_class(pred.numpy(), y[:, 0].numpy(), labels)
    return [round(scores[c], 3) for c in labels]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preprocessed", type=Path, required=True)
    parser.add_argument("-d", "--dataset", required=True)
    parser.add_argument("--fold", type=int, default=0)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--init-seed", type=int, default=0)
    parser.add_argument("--network", action="append", required=True, help="NAME=PLANS.json[@JSON]")
    args = parser.parse_args()
    networks = [_parse_network(n) for n in args.network]
    os.environ["nnUNet_preprocessed"] = str(args.preprocessed.resolve())
    os.environ.setdefault("nnUNet_raw", str(args.preprocessed.resolve()))
    os.environ.setdefault("nnUNet_results", str(args.preprocessed.resolve() / ".paired_fit_results"))
    os.environ["nnUNet_n_proc_DA"] = "0"
    torch.set_num_threads(1)

    from batchgeneratorsv2.transforms.utils.deep_supervision_downsampling import DownsampleSegForDSTransform
    from nnunetv2.run.run_training import get_trainer_from_args
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
    from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    np.random.seed(args.data_seed)
    torch.manual_seed(args.data_seed)
    trainer = get_trainer_from_args(args.dataset, "3d_fullres", args.fold, "nnUNetTrainer", "nnUNetPlans",
                                    device=torch.device("cpu"))
    trainer.enable_deep_supervision = False  # full-resolution targets; each network downsamples its own
    trainer._set_batch_size_and_oversample()
    loader, _ = trainer.get_dataloaders()
    batches = []
    for _ in range(args.steps):
        batch = next(loader)
        batches.append((batch["data"].clone(), batch["target"].clone()))
    tr_keys, val_keys = trainer.do_split()
    folder = Path(trainer.preprocessed_dataset_folder)
    patch = list(trainer.configuration_manager.patch_size)
    cases = {"train": _load_cases(folder, sorted(tr_keys), patch),
             "val": _load_cases(folder, sorted(val_keys), patch)}
    labels = list(trainer.label_manager.foreground_labels)
    batch_dice = trainer.configuration_manager.batch_dice
    checksum = float(sum(float(b[0].double().sum()) for b in batches))
    print(f"{len(batches)} batches of {tuple(batches[0][0].shape)}, checksum {checksum:.6g}; "
          f"train {sorted(tr_keys)}, val {sorted(val_keys)}", file=sys.stderr, flush=True)

    for name, plans_file, extra in networks:
        with open(plans_file) as f:
            arch = json.load(f)["configurations"]["3d_fullres"]["architecture"]
        torch.manual_seed(args.init_seed)
        net = get_network_from_plans(arch["network_class_name"], {**arch["arch_kwargs"], **extra},
                                     arch["_kw_requires_import"], batches[0][0].shape[1],
                                     trainer.label_manager.num_segmentation_heads, allow_init=True,
                                     deep_supervision=True)
        strides = arch["arch_kwargs"]["strides"]
        scales = [list(s) for s in 1 / np.cumprod(np.vstack(strides), axis=0)][:-1]
        weights = np.array([1 / 2 ** i for i in range(len(scales))])
        weights[-1] = 0
        dc_kwargs = {"batch_dice": batch_dice, "smooth": 1e-5, "do_bg": False, "ddp": False}
        base_loss = DC_and_CE_loss(dc_kwargs, {}, weight_ce=1, weight_dice=1, ignore_label=None,
                                   dice_class=MemoryEfficientSoftDiceLoss)
        loss_fn = DeepSupervisionWrapper(base_loss, weights / weights.sum())
        downsample = DownsampleSegForDSTransform(ds_scales=scales)
        optimizer = torch.optim.SGD(net.parameters(), 1e-2, weight_decay=3e-5, momentum=0.99, nesterov=True)
        scheduler = PolyLRScheduler(optimizer, 1e-2, args.steps)  # nnU-Net's poly decay, stepped per batch
        losses, record = [], []
        start = time.time()
        for step, (x, y) in enumerate(batches):
            scheduler.step(step)
            per_case = [downsample._apply_to_segmentation(y[i]) for i in range(y.shape[0])]
            target = [torch.stack(level) for level in zip(*per_case)]
            net.train()
            optimizer.zero_grad()
            loss = loss_fn(net(x), target)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 12)
            optimizer.step()
            losses.append(float(loss.detach()))
            if (step + 1) % args.every == 0 or step + 1 == args.steps:
                record.append({"step": step + 1, "loss": round(float(np.mean(losses[-args.every:])), 3),
                               **{k: hard_dice(net, *v, labels) for k, v in cases.items()}})
        print(json.dumps({"network": name, "data_seed": args.data_seed, "init_seed": args.init_seed,
                          "record": record, "s_per_step": round((time.time() - start) / args.steps, 2)}),
              flush=True)


if __name__ == "__main__":
    main()
