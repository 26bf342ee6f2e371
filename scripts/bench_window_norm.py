"""Benchmark: the pretraining encoder pass with per-slice InstanceNorm statistics (the default) against
statistics over each volume window (``objective.norm_over_window``), in one process. Prints JSON.

The pass is the one JointSSLModel.forward runs: the 2D global views and the slices of every 3D view of every
window in one batch through f_intra, forward and backward (a sum of the skips as the loss). Sizes default to
the demo's self-configured pretraining (cpu preset, view 48, 16 2D items and 8 windows of 16 slices, two
views each). Modes: ``per_slice``; ``window`` (no padding slices);
``window_padded`` (every other window with its last quarter of slices padding: the masked statistics);
``volume`` (fine-tuning's ``norm_over_volume``: every --slices consecutive rows one volume, 2D rows included).
Modes take turns for --rounds rounds so that a shared machine's slow phases fall on all of them; time is the
median over all timed iterations, ratio = mode / per_slice.

    python scripts/bench_window_norm.py [--preset cpu] [--view 48] [--b2 16] [--b3 8] [--slices 16]
        [--iters 3] [--rounds 3] [--threads N] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from nnssl_joint.models.encoder import build_encoder_2d
from nnssl_joint.models.norms import VolumeInstanceNorm2d, use_volume_statistics, window_statistics
from nnssl_joint.models.preset import load_preset


def _valid(b3: int, n: int, views: int, padded: bool) -> torch.Tensor:
    valid = torch.ones(b3, n, dtype=torch.bool)
    if padded:
        valid[::2, n - max(1, n // 4):] = False
    return valid.repeat_interleave(views, 0)


def _step(encoder: torch.nn.Module, x: torch.Tensor, valid: torch.Tensor | int | None, leading: int) -> float:
    encoder.zero_grad(set_to_none=True)
    norms = [m for m in encoder.modules() if isinstance(m, VolumeInstanceNorm2d)]
    for norm in norms:  # an int: fine-tuning's norm_over_volume, every `valid` consecutive rows one volume
        norm.slices = valid if isinstance(valid, int) else 1
    t0 = time.perf_counter()
    if valid is None or isinstance(valid, int):
        skips = encoder(x)
    else:
        with window_statistics(encoder, valid, leading):
            skips = encoder(x)
    sum(s.float().sum() for s in skips).backward()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--view", type=int, default=48)
    ap.add_argument("--b2", type=int, default=16)
    ap.add_argument("--b3", type=int, default=8)
    ap.add_argument("--slices", type=int, default=16)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    preset = load_preset(args.preset)
    plain = build_encoder_2d(preset, 1)
    pooled = build_encoder_2d(preset, 1)
    pooled.load_state_dict(plain.state_dict())
    use_volume_statistics(pooled)
    views = 2
    leading = args.b2 * views
    rows = leading + args.b3 * views * args.slices
    x = torch.randn(rows, 1, args.view, args.view)
    modes = {"per_slice": (plain, None),
             "window": (pooled, _valid(args.b3, args.slices, views, padded=False)),
             "window_padded": (pooled, _valid(args.b3, args.slices, views, padded=True)),
             "volume": (pooled, args.slices)}
    for encoder, valid in modes.values():  # untimed: one-time allocations
        _step(encoder, x, valid, leading)
    times: dict[str, list[float]] = {name: [] for name in modes}
    for _ in range(args.rounds):
        for name, (encoder, valid) in modes.items():
            times[name] += [_step(encoder, x, valid, leading) for _ in range(args.iters)]
    base = statistics.median(times["per_slice"])
    result = {
        "benchmark": "window_norm_encoder_pass",
        "preset": args.preset, "view": args.view, "rows": rows, "rows_2d": leading,
        "windows": args.b3 * views, "slices": args.slices,
        "threads": torch.get_num_threads(), "torch": torch.__version__, "machine": platform.processor(),
        "seconds_median": {name: round(statistics.median(t), 4) for name, t in times.items()},
        "seconds_min": {name: round(min(t), 4) for name, t in times.items()},
        "ratio_to_per_slice": {name: round(statistics.median(t) / base, 3) for name, t in times.items()},
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
