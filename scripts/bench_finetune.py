"""Benchmark: seconds per training iteration of the plugin's 3D network (SliceWiseUNet3D) vs nnU-Net's
stock 3d_fullres network (PlainConvUNet, topology from nnU-Net's own get_pool_and_conv_props) on the
same patch and batch, in the same process, plus parameter counts. Prints JSON.

    python scripts/bench_finetune.py [--patch 32,64,64] [--batch 2] [--iters 3] [--presets cpu,gpu]
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from dynamic_network_architectures.initialization.weight_init import InitWeights_He
from nnunetv2.experiment_planning.experiment_planners.network_topology import get_pool_and_conv_props
from torch import nn

from nnssl_joint.models.downstream import SliceWiseUNet3D


def stock_unet(patch: list[int], spacing: list[float], in_ch: int, classes: int) -> nn.Module:
    _, pools, kernels, patch_out, _ = get_pool_and_conv_props(spacing, patch, 4, 999999)
    n = len(pools)
    net = PlainConvUNet(in_ch, n, [min(320, 32 * 2**i) for i in range(n)], nn.Conv3d, kernels, pools, [2] * n,
                        classes, [2] * (n - 1), conv_bias=True, norm_op=nn.InstanceNorm3d,
                        norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=nn.LeakyReLU,
                        nonlin_kwargs={"inplace": True}, deep_supervision=True)
    net.apply(InitWeights_He(1e-2))
    return net, [int(p) for p in patch_out]


def seconds_per_iteration(net: nn.Module, patch: list[int], batch: int, classes: int, iters: int) -> float:
    opt = torch.optim.SGD(net.parameters(), 1e-2, momentum=0.99, nesterov=True)
    x = torch.randn(batch, 1, *patch)
    y = torch.randint(0, classes, (batch, *patch))
    times = []
    for i in range(iters + 1):
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        out = net(x)
        out = out[0] if isinstance(out, (list, tuple)) else out
        loss = nn.functional.cross_entropy(out, y)
        loss.backward()
        opt.step()
        if i:  # first iteration warms up allocators
            times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patch", default="32,64,64")
    ap.add_argument("--spacing", default="1,1,1")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--presets", default="cpu,gpu")
    ap.add_argument("--classes", type=int, default=4)
    args = ap.parse_args()
    patch = [int(v) for v in args.patch.split(",")]
    spacing = [float(v) for v in args.spacing.split(",")]
    torch.manual_seed(0)
    stock, stock_patch = stock_unet(patch, spacing, 1, args.classes)
    result = {"machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
                         f"torch {torch.__version__}",
              "patch": patch, "batch": args.batch, "device": "cpu"}
    if stock_patch != patch:
        result["note"] = f"nnU-Net's topology rounds the patch to {stock_patch}; both nets use {stock_patch}"
        patch = stock_patch
    s_stock = seconds_per_iteration(stock, patch, args.batch, args.classes, args.iters)
    result["stock_PlainConvUNet_3d"] = {"s_per_iter": round(s_stock, 3),
                                        "params": sum(p.numel() for p in stock.parameters())}
    for preset in args.presets.split(","):
        net = SliceWiseUNet3D(1, args.classes, True, preset=preset)
        net.apply(net.initialize)
        s = seconds_per_iteration(net, patch, args.batch, args.classes, args.iters)
        result[f"SliceWiseUNet3D_{preset}"] = {"s_per_iter": round(s, 3),
                                               "ratio_vs_stock": round(s / s_stock, 2),
                                               "params": sum(p.numel() for p in net.parameters())}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
