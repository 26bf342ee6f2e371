"""One-batch fitting speed (issue 16): stock nnU-Net's 3d_fullres PlainConvUNet against the plugin's
SliceWiseUNet3D variants on the same two labeled cases (the first 32^3 of each preprocessed volume,
zero-padded), nnU-Net's DC+CE loss on the full-resolution output (no deep supervision), SGD as nnU-Net
(lr 1e-2, momentum 0.99, Nesterov, weight decay 3e-5, gradient norm clipped at 12), no augmentation, one
thread. Prints one JSON line per (seed, network): the loss every 10 steps, the hard Dice per class on the
batch itself, seconds per step.

    python scripts/fit_one_batch_3d.py PREPROCESSED/Dataset503_SynthOrgans [STEPS] [NET,NET...]

NET: stock, plugin, plugin_nopool, plugin_tp, plugin_volnorm (default: all).

PREPROCESSED/DatasetXXX must hold nnUNetPlans.json and nnsslJointPlans.json with their 3d_fullres data (a
`nnssl_joint benchmark -c 3d_fullres --preset nnunet` output folder's preprocessed/ has both)."""
import json
import sys
import time

import numpy as np
import torch
from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2
from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from paired_fit_3d import hard_dice  # scripts/ is on sys.path when this file runs as a script

if __name__ == "__main__":
    torch.set_num_threads(1)
    root = sys.argv[1].rstrip("/")
    ds = nnUNetDatasetBlosc2(f"{root}/nnsslJointPlans_3d_fullres", ["SynthOrgans_000", "SynthOrgans_001"])
    xs, ys = [], []
    for k in ["SynthOrgans_000", "SynthOrgans_001"]:
        data, seg, _, _ = ds.load_case(k)
        data, seg = np.asarray(data), np.asarray(seg)
        pad = [(0, 0)] + [(0, max(0, 32 - n)) for n in data.shape[1:]]
        data, seg = np.pad(data, pad), np.pad(seg, pad)
        xs.append(data[:, :32, :32, :32])
        ys.append(seg[:, :32, :32, :32])
    x = torch.from_numpy(np.stack(xs)).float()
    y = torch.from_numpy(np.stack(ys)).long().clamp(min=0)
    variants = {
        "stock": (f"{root}/nnUNetPlans.json", {}),
        "plugin": (f"{root}/nnsslJointPlans.json", {}),
        "plugin_nopool": (f"{root}/nnsslJointPlans.json", {"pool_slices_from_stage": None}),
        "plugin_tp": (f"{root}/nnsslJointPlans.json", {"through_plane_convs": True}),
        "plugin_volnorm": (f"{root}/nnsslJointPlans.json", {"norm_over_volume": True}),
    }
    steps = int(sys.argv[2]) if len(sys.argv) > 2 else 60
    if len(sys.argv) > 3:
        chosen = set(sys.argv[3].split(","))
        unknown = chosen - set(variants)
        if unknown:
            raise SystemExit(f"unknown network(s) {sorted(unknown)}; choose from {sorted(variants)}")
        variants = {k: v for k, v in variants.items() if k in chosen}
    for seed in (0, 1):
        for name, (plans, extra) in variants.items():
            with open(plans) as f:
                a = json.load(f)["configurations"]["3d_fullres"]["architecture"]
            torch.manual_seed(seed)
            net = get_network_from_plans(a["network_class_name"], {**a["arch_kwargs"], **extra},
                                         a["_kw_requires_import"], 1, 4, allow_init=True,
                                         deep_supervision=False)
            loss_fn = DC_and_CE_loss({"batch_dice": True, "smooth": 1e-5, "do_bg": False, "ddp": False}, {},
                                     weight_ce=1, weight_dice=1, ignore_label=None,
                                     dice_class=MemoryEfficientSoftDiceLoss)
            opt = torch.optim.SGD(net.parameters(), 1e-2, weight_decay=3e-5, momentum=0.99, nesterov=True)
            net.train()
            curve = []
            t0 = time.time()
            for i in range(steps):
                opt.zero_grad()
                loss = loss_fn(net(x), y)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(net.parameters(), 12)
                opt.step()
                if (i + 1) % 10 == 0:
                    curve.append(round(float(loss.detach()), 3))
            dice = hard_dice(net, x, y, [1, 2, 3])
            print(json.dumps({"seed": seed, "net": name, "loss_every_10": curve, "train_dice": dice,
                              "s_per_step": round((time.time() - t0) / steps, 2)}), flush=True)
