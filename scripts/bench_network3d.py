"""Benchmark: the plugin's 3D fine-tuning network (SliceWiseUNet3D) against stock nnU-Net's 3d_fullres
network at nnU-Net's own 3d_fullres patch and batch, time per training iteration and peak memory, in one
process. Prints JSON (and writes it with --out).

Patch, batch and the stock network come from nnU-Net's ExperimentPlanner.get_plans_for_configuration
(its 8 GB default target) run on a dataset fingerprint given here instead of read from disk:

    ct: spacing 1 x 0.8 x 0.8 mm, median shape 300 x 512 x 512 (CT-like)  -> patch 96x160x160, batch 2
    mr: spacing 1 x 1 x 1 mm, median shape 140 x 170 x 140 (MR-like)      -> patch 128^3, batch 2

Every network is then built the way nnU-Net builds it (get_network_from_plans for stock, the plugin's
class for the plugin, 4 output classes) and trained on random data for --warmup + --iters iterations:
forward, nnU-Net's loss (DC_and_CE_loss in DeepSupervisionWrapper with the trainer's weights, targets at
every deep-supervision scale), backward, SGD step (nnU-Net's settings); autocast + GradScaler on CUDA as
nnU-Net trains. Time: median (and min) over the timed iterations. Memory: on CUDA the peak of
torch.cuda.max_memory_allocated over the timed iterations minus the allocation before the network was
built; on CPU the peak resident set size (sampled every 2 ms in a thread; glibc is told to mmap every
allocation from 1 MiB on, so freed tensors leave the resident set) minus the resident size before the
network was built. Networks run one after another (one in memory at a time), after one untimed
iteration of a small plugin and stock network (so one-time library allocations count for neither).
Two machine-independent figures come with every network: the activations saved for backward in one
training forward pass (distinct storages, in the run's dtype) and the FLOPs of forward + backward,
counted by torch.utils.flop_counter on the meta device (recomputation included). From them an estimate of
the training peak that does not depend on the allocator: saved activations + parameters, gradients and
SGD momentum (3 x the parameter bytes); on CPU the sampled resident set size is coarse (it misses short
peaks and allocator reuse), so compare networks by this estimate there.

    python scripts/bench_network3d.py [--datasets ct,mr] [--presets cpu,gpu] [--variants default,full]
        [--recompute on,off] [--device cpu|cuda] [--batch N] [--patch Z,Y,X] [--iters 2] [--warmup 1]
        [--rounds 1] [--out FILE.json]

--variants: SliceWiseUNet3D's pool_slices_from_stage values: "default" (the class default), "full"
(None: every decoder level keeps all slices, the behaviour before the option) or a stage number;
--recompute: its recompute_encoder values. --rounds R measures every network R times, the networks
taking turns, so that a shared machine's slow phases fall on all of them (results: docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import gc
import json
import os
import platform
import statistics
import sys
import threading
import time
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from torch import nn
from torch.nn import functional as F
from torch.utils.flop_counter import FlopCounterMode

from nnssl_joint.models.downstream import (
    DEFAULT_POOL_SLICES_FROM_STAGE,
    SliceWiseUNet3D,
    pool_op_kernel_sizes,
)
from nnssl_joint.models.preset import load_preset

#: name -> (modality, spacing (z, y, x) in mm, median shape in voxels, number of training cases)
DATASETS: dict[str, tuple[str, tuple[float, ...], tuple[int, ...], int]] = {
    "ct": ("CT", (1.0, 0.8, 0.8), (300, 512, 512), 50),
    "mr": ("MRI", (1.0, 1.0, 1.0), (140, 170, 140), 50),
}
NUM_CLASSES = 4


class FingerprintPlanner(ExperimentPlanner):
    """nnU-Net's ExperimentPlanner with the fingerprint given instead of read from a preprocessed
    dataset; only get_plans_for_configuration is used. The attributes are ExperimentPlanner.__init__'s
    defaults (nnU-Net 2.x, 8 GB target)."""

    def __init__(self, modality: str, num_classes: int) -> None:  # no super().__init__: there is no dataset
        self.dataset_json = {"channel_names": {"0": modality},
                             "labels": {"background": 0, **{f"c{i}": i for i in range(1, num_classes)}}}
        self.dataset_fingerprint = {
            "foreground_intensity_properties_per_channel": {
                "0": {"mean": 0.0, "std": 1.0, "percentile_00_5": -1.0, "percentile_99_5": 1.0}},
            "median_relative_size_after_cropping": 1.0}
        self.__dict__.update(_planner_defaults())


def _planner_defaults() -> dict[str, Any]:
    return {"UNet_base_num_features": 32, "UNet_reference_val_3d": 560000000,
            "UNet_reference_val_2d": 85000000, "UNet_reference_com_nfeatures": 32,
            "UNet_reference_val_corresp_GB": 8,
            "UNet_reference_val_corresp_bs_2d": 12, "UNet_reference_val_corresp_bs_3d": 2,
            "UNet_featuremap_min_edge_length": 4, "UNet_blocks_per_stage_encoder": (2,) * 14,
            "UNet_blocks_per_stage_decoder": (2,) * 13, "UNet_min_batch_size": 2, "UNet_max_features_2d": 512,
            "UNet_max_features_3d": 320, "max_dataset_covered": 0.05, "UNet_vram_target_GB": 8,
            "preprocessor_name": "DefaultPreprocessor", "anisotropy_threshold": 3,
            "suppress_transpose": False, "overwrite_target_spacing": None, "UNet_class": _unet_class()}


def _unet_class():
    from dynamic_network_architectures.architectures.unet import PlainConvUNet
    return PlainConvUNet


@cache
def nnunet_3d_fullres_plan(dataset: str) -> dict[str, Any]:
    """nnU-Net's own 3d_fullres configuration (patch, batch, architecture) for a built-in fingerprint."""
    modality, spacing, shape, n_cases = DATASETS[dataset]
    planner = FingerprintPlanner(modality, NUM_CLASSES)
    plan = planner.get_plans_for_configuration(spacing, shape, "bench", float(np.prod(shape)) * n_cases, {})
    return {"spacing": list(spacing), "median_shape": list(shape),
            "patch_size": [int(p) for p in plan["patch_size"]], "batch_size": int(plan["batch_size"]),
            "architecture": plan["architecture"]}


def parse_variant(value: str) -> int | None:
    if value == "default":
        return DEFAULT_POOL_SLICES_FROM_STAGE
    if value == "full":
        return None
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"variant must be 'default', 'full' or a stage number, got {value!r}") from None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", default="ct,mr", help=f"comma-separated, of {sorted(DATASETS)}")
    ap.add_argument("--presets", default="cpu,gpu", help="comma-separated architecture presets")
    ap.add_argument("--variants", default="default,full",
                    help="comma-separated pool_slices_from_stage values: default, full or a stage number")
    ap.add_argument("--recompute", default="on",
                    help="comma-separated recompute_encoder values to measure: on, off")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--batch", type=int, default=None, help="override nnU-Net's batch size")
    ap.add_argument("--patch", default=None, help="override nnU-Net's patch size, Z,Y,X (for all datasets)")
    ap.add_argument("--iters", type=int, default=2, help="timed iterations per network")
    ap.add_argument("--rounds", type=int, default=1,
                    help="measure every network this many times, the networks taking turns (ABAB...)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed iterations per network before timing")
    ap.add_argument("--no-stock", action="store_true", help="skip stock nnU-Net (no ratios then)")
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = ap.parse_args(argv)
    args.datasets = [d for d in args.datasets.split(",") if d]
    unknown = [d for d in args.datasets if d not in DATASETS]
    if unknown or not args.datasets:
        ap.error(f"--datasets: unknown {unknown}, choose from {sorted(DATASETS)}")
    args.presets = [p for p in args.presets.split(",") if p]
    for p in args.presets:
        try:
            load_preset(p)
        except Exception as e:  # noqa: BLE001 - report any failure to load the preset as a usage error
            ap.error(f"--presets: cannot load preset {p!r}: {e}")
    try:
        args.variants = [parse_variant(v) for v in args.variants.split(",") if v]
    except argparse.ArgumentTypeError as e:
        ap.error(f"--variants: {e}")
    flags = {"on": True, "off": False}
    args.recompute = [flags.get(v) for v in args.recompute.split(",") if v]
    if not args.recompute or None in args.recompute:
        ap.error("--recompute: comma-separated values of 'on' and 'off'")
    if args.patch is not None:
        try:
            args.patch = [int(v) for v in args.patch.split(",")]
        except ValueError:
            args.patch = []
        if len(args.patch) != 3 or min(args.patch) < 1:
            ap.error("--patch needs three positive integers Z,Y,X")
    if args.batch is not None and args.batch < 1:
        ap.error("--batch must be >= 1")
    if args.iters < 1 or args.warmup < 0 or args.rounds < 1:
        ap.error("--iters and --rounds must be >= 1 and --warmup >= 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error(f"--device cuda: CUDA is not available here (torch {torch.__version__}, "
                 f"built with CUDA {torch.version.cuda}); use --device cpu")
    return args


def _mmap_large_allocations() -> None:
    """glibc's malloc keeps freed blocks below a moving threshold (up to 32 MiB) in its heap, which hides
    later allocations from the resident set size; a fixed 1 MiB mmap threshold returns them to the OS."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Samples the resident set size in a thread (CPU memory has no allocator statistics in torch)."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval, self.peak, self._stop = interval, 0, threading.Event()

    def __enter__(self) -> PeakRSS:  # noqa: PYI034 - final class
        self.peak = _rss_bytes()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(self.interval)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())


def _targets(patch: list[int], batch: int, strides: list[list[int]],
             device: torch.device) -> list[torch.Tensor]:
    """Random labels and their deep-supervision versions as nnU-Net's DownsampleSegForDSTransform makes them
    (scales from the plans' strides, round(), nearest-exact)."""
    g = torch.Generator().manual_seed(0)
    seg = torch.randint(0, NUM_CLASSES, (batch, 1, *patch), generator=g).float()
    scales = 1 / np.cumprod(np.vstack(strides), axis=0)[:-1]
    out = []
    for scale in scales:
        shape = [round(p * s) for p, s in zip(patch, scale)]
        out.append(seg if shape == patch else F.interpolate(seg, shape, mode="nearest-exact"))
    return [t.to(device) for t in out]


def _loss(n_outputs: int) -> nn.Module:
    loss = DC_and_CE_loss({"batch_dice": False, "smooth": 1e-5, "do_bg": False, "ddp": False}, {},
                          weight_ce=1, weight_dice=1, ignore_label=None,
                          dice_class=MemoryEfficientSoftDiceLoss)
    weights = np.array([1 / (2 ** i) for i in range(n_outputs)])
    weights[-1] = 0
    return DeepSupervisionWrapper(loss, weights / weights.sum())


def train_iterations(build, patch: list[int], batch: int, strides: list[list[int]], device: torch.device,
                     warmup: int, iters: int, count_flops: bool = True) -> dict[str, Any]:
    gc.collect()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_bytes()
    torch.manual_seed(0)
    net = build().to(device)
    net.train()
    opt = torch.optim.SGD(net.parameters(), 1e-2, momentum=0.99, nesterov=True, weight_decay=3e-5)
    scaler = torch.amp.GradScaler("cuda") if cuda else None
    x = torch.randn(batch, 1, *patch, generator=torch.Generator().manual_seed(1)).to(device)
    targets = _targets(patch, batch, strides, device)
    loss_fn = _loss(len(targets))
    times: list[float] = []
    peak = 0
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        saved[storage.data_ptr()] = storage.nbytes()
        return t

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        saved.clear()
        hooks = torch.autograd.graph.saved_tensors_hooks(pack, _unpack)
        with torch.autocast(device.type, enabled=cuda), hooks:
            out = net(x)
            loss = loss_fn(out, targets)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(net.parameters(), 12)
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 12)
            opt.step()
        return float(loss.detach())

    for _ in range(warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    for _ in range(iters):
        t = time.perf_counter()
        if cuda:
            step()
            torch.cuda.synchronize()
        else:
            with PeakRSS() as rss:
                step()
            peak = max(peak, rss.peak)
        times.append(time.perf_counter() - t)
    if cuda:
        peak = torch.cuda.max_memory_allocated()
    param_bytes = sum(p.numel() * p.element_size() for p in net.parameters())
    result = {"times": times, "s_per_iter": round(statistics.median(times), 3),
              "s_per_iter_min": round(min(times), 3),
              "peak_memory_gib": round((peak - base) / 2**30, 3),
              "saved_activations_gib": round(sum(saved.values()) / 2**30, 3),
              "estimated_training_memory_gib": round((sum(saved.values()) + 3 * param_bytes) / 2**30, 3),
              "tflop_per_iter": round(_flops(build, patch, batch) / 1e12, 3) if count_flops else None,
              "params_m": round(sum(p.numel() for p in net.parameters()) / 1e6, 2)}
    return result


def _unpack(t: torch.Tensor) -> torch.Tensor:
    return t


def _flops(build, patch: list[int], batch: int) -> float:
    """Forward + backward FLOPs of one training pass, on the meta device (nothing is computed)."""
    with torch.device("meta"):
        net = build()
    net.train()
    x = torch.empty(batch, 1, *patch, device="meta")
    with FlopCounterMode(display=False) as counter:
        out = net(x)
        sum(o.float().mean() for o in (out if isinstance(out, (list, tuple)) else [out])).backward()
    return float(counter.get_total_flops())


def _warm_libraries(device: torch.device) -> None:
    """One untimed training iteration of both kinds of network on a small patch: thread pools, kernel
    caches and allocator state are set up before the first measured network."""
    arch = copy.deepcopy(nnunet_3d_fullres_plan("mr")["architecture"])
    stock = get_network_from_plans(arch["network_class_name"], arch["arch_kwargs"],
                                   arch["_kw_requires_import"], 1, NUM_CLASSES, allow_init=True,
                                   deep_supervision=True)
    patch = [32, 64, 64]
    train_iterations(lambda: stock, patch, 1, arch["arch_kwargs"]["strides"], device, 0, 1, count_flops=False)
    train_iterations(lambda: SliceWiseUNet3D(1, NUM_CLASSES, True, "cpu"), patch, 1,
                     pool_op_kernel_sizes(load_preset("cpu"), 3), device, 0, 1, count_flops=False)


STOCK = "stock_PlainConvUNet"


def _merge(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One record from a network's rounds: time over all timed iterations, the largest memory."""
    times = [t for r in runs for t in r.pop("times")]
    merged = dict(runs[0])
    merged.update(s_per_iter=round(statistics.median(times), 3), s_per_iter_min=round(min(times), 3),
                  s_per_iter_all=[round(t, 3) for t in times],
                  peak_memory_gib=max(r["peak_memory_gib"] for r in runs))
    return merged


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    result: dict[str, Any] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, "
                   f"torch {torch.__version__}"
                   + (f", {torch.cuda.get_device_name()}" if device.type == "cuda" else ""),
        "device": args.device, "iters": args.iters, "warmup": args.warmup, "rounds": args.rounds,
        "memory": "CUDA max_memory_allocated increase" if device.type == "cuda"
        else "peak resident set size increase (sampled)", "datasets": {}}
    _warm_libraries(device)
    for dataset in args.datasets:
        plan = copy.deepcopy(nnunet_3d_fullres_plan(dataset))
        patch = args.patch or plan["patch_size"]
        batch = args.batch or plan["batch_size"]
        entry: dict[str, Any] = {"nnunet_patch_size": plan["patch_size"],
                                 "nnunet_batch_size": plan["batch_size"], "patch_size": patch,
                                 "batch_size": batch, "spacing": plan["spacing"],
                                 "median_shape": plan["median_shape"], "networks": {}}
        result["datasets"][dataset] = entry
        arch = plan["architecture"]
        stock_strides = [list(s) for s in arch["arch_kwargs"]["strides"]]
        networks = []  # (name, build, deep-supervision strides)
        if not args.no_stock:
            def build_stock(arch=arch):
                return get_network_from_plans(arch["network_class_name"], arch["arch_kwargs"],
                                              arch["_kw_requires_import"], 1, NUM_CLASSES, allow_init=True,
                                              deep_supervision=True)
            if args.patch is not None and any(p % int(np.prod([s[i] for s in stock_strides]))
                                              for i, p in enumerate(patch)):
                entry["note"] = "stock skipped: --patch is not divisible by nnU-Net's strides"
            else:
                networks.append((STOCK, build_stock, stock_strides))
        for preset in args.presets:
            for variant, recompute in [(v, r) for v in args.variants for r in args.recompute]:
                def build(preset=preset, variant=variant, recompute=recompute):
                    net = SliceWiseUNet3D(1, NUM_CLASSES, True, preset=preset, pool_slices_from_stage=variant,
                                          recompute_encoder=recompute)
                    net.apply(net.initialize)
                    return net
                name = (f"SliceWiseUNet3D_{preset}_pool_slices_from_{'none' if variant is None else variant}"
                        f"_recompute_{'on' if recompute else 'off'}")
                networks.append((name, build, pool_op_kernel_sizes(load_preset(preset), 3)))
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name, _, _ in networks}
        for round_ in range(args.rounds):  # networks take turns, so slow phases of a shared machine hit all
            for name, build, strides in networks:
                runs[name].append(train_iterations(build, patch, batch, strides, device, args.warmup,
                                                   args.iters, count_flops=round_ == 0))
                print(dataset, f"round {round_ + 1}", name, runs[name][-1], file=sys.stderr, flush=True)
        for name, _, _ in networks:
            entry["networks"][name] = _merge(runs[name])
        stock = entry["networks"].get(STOCK)
        for name, r in entry["networks"].items():
            if stock and name != STOCK:
                r["time_ratio_vs_stock"] = round(r["s_per_iter"] / stock["s_per_iter"], 2)
                r["memory_ratio_vs_stock"] = round(r["peak_memory_gib"] / stock["peak_memory_gib"], 2)
                r["estimated_memory_ratio_vs_stock"] = round(
                    r["estimated_training_memory_gib"] / stock["estimated_training_memory_gib"], 2)
                r["saved_activations_ratio_vs_stock"] = round(
                    r["saved_activations_gib"] / stock["saved_activations_gib"], 2)
                r["flop_ratio_vs_stock"] = round(r["tflop_per_iter"] / stock["tflop_per_iter"], 2)
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    _mmap_large_allocations()
    result = run(args)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()
