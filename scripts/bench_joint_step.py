"""Benchmark: one pretraining step of JointSSLModel (forward, backward, AdamW step) under the default
objective and under variants that change one cost each, in one process. Prints JSON.

Sizes default to the demo's self-configured CPU pretraining (cpu preset, 2D global views of 48 px, 16 2D
items with 2 global and 2 small views, volume windows of 16 slices in two views each). Variants, each with
its windows per step: ``default`` (8 windows; the baseline); from the default, ``windows_4`` (4 windows: bar 1
fails, docs/pretraining.md, twenty-fourth pass), ``dense_keys_2048`` (2048 random dense negatives),
``no_key_network`` (``volume_contrast_momentum: 0``: no second encoder forward), ``no_dense`` (``lambda_dense:
0``), ``no_window_statistics`` (``norm_over_window: false``); ``paper`` (the paper's configuration at 2
windows, the defaults before the twenty-third pass).
Variants take turns for --rounds rounds so that a shared machine's slow phases fall on all of them; time is
the median over all timed steps, ratio = variant / the first variant listed.

    python scripts/bench_joint_step.py [--view 48] [--b2 16] [--slices 16] [--iters 3] [--rounds 2]
        [--variants default,windows_4,...] [--threads N] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from nnssl_joint.data.augment import coordinate_maps
from nnssl_joint.models.preset import load_preset
from nnssl_joint.pretrain.model import JointSSLModel
from nnssl_joint.ssl.objective import ObjectiveConfig, combine_losses

VARIANTS: dict[str, tuple[dict | str, int]] = {
    "default": ({}, 8),
    "windows_4": ({}, 4),
    "dense_keys_2048": ({"dense_keys": 2048}, 8),
    "no_key_network": ({"volume_contrast_momentum": 0.0}, 8),
    "no_dense": ({"lambda_dense": 0.0}, 8),
    "no_window_statistics": ({"norm_over_window": False}, 8),
    "paper": ("paper", 2),
}


def _objective(spec: dict | str) -> ObjectiveConfig:
    common = {"num_prototypes_2d": 3000, "num_prototypes_3d": 4}
    if spec == "paper":
        return ObjectiveConfig.paper(**common)
    return ObjectiveConfig(**{**common, **spec})


def _batches(b2: int, b3: int, slices: int, view: int, g: torch.Generator) -> tuple[dict, dict]:
    small = view // 2
    maps = coordinate_maps(view, view)
    batch_2d = {"global_views": torch.randn(b2, 2, 1, view, view, generator=g),
                "small_views": torch.randn(b2, 2, 1, small, small, generator=g),
                "global_coords": maps[None, None].expand(b2, 2, -1, -1, -1).clone()}
    valid = torch.ones(b3, slices, dtype=torch.bool)
    valid[::2, slices - slices // 4:] = False  # every other window ends in padding, as short volumes do
    batch_3d = {"views": torch.randn(b3, 2, 1, slices, view, view, generator=g), "valid": valid,
                "case": torch.arange(b3), "coords": maps[None, None].expand(b3, 2, -1, -1, -1).clone()}
    return batch_2d, batch_3d


def _step(model: JointSSLModel, opt: torch.optim.Optimizer, objective: ObjectiveConfig, batches: tuple,
          iteration: int) -> float:
    t0 = time.perf_counter()
    stage = objective.stage_at(0)
    loss = combine_losses(model(*batches, iteration, stage), stage)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--view", type=int, default=48)
    ap.add_argument("--b2", type=int, default=16)
    ap.add_argument("--slices", type=int, default=16)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        ap.error(f"unknown variants {unknown}; known: {sorted(VARIANTS)}")
    setups = {}
    for name in names:
        spec, b3 = VARIANTS[name]
        torch.manual_seed(0)
        objective = _objective(spec)
        model = JointSSLModel(load_preset("cpu"), 1, objective).train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        g = torch.Generator().manual_seed(0)
        batches = _batches(args.b2, b3, args.slices, args.view, g)
        _step(model, opt, objective, batches, 0)  # warm-up (allocator, lazy initialisation)
        setups[name] = (model, opt, objective, batches, b3)
    times: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(args.rounds):
        for name in names:
            model, opt, objective, batches, _b3 = setups[name]
            times[name] += [_step(model, opt, objective, batches, 1 + i) for i in range(args.iters)]
    base = statistics.median(times[names[0]])
    result = {
        "benchmark": "joint_step", "torch": torch.__version__, "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "sizes": {"view": args.view, "b2": args.b2, "slices": args.slices},
        "baseline": names[0],
        "variants": {n: {"windows": setups[n][4], "median_s": round(statistics.median(t), 3),
                         "ratio": round(statistics.median(t) / base, 3), "steps": len(t)}
                     for n, t in times.items()},
    }
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
