"""Networks of a finished benchmark side by side: parameters, seconds per epoch and per training
iteration, Dice. For issue 16's comparison of the plugin's networks with stock nnU-Net at the same budget.

    python scripts/bench_networks.py BENCHMARK_OUT [--json out.json]

Reads OUT/report/benchmark.json and every run's checkpoint_final.pth and nnU-Net training log. Seconds
per iteration are nnU-Net's logged epoch time (training iterations plus the validation iterations)
divided by the training iterations, so they slightly overstate the training step alone.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path

import torch

_EPOCH_TIME = re.compile(r"Epoch time: ([0-9.]+) s")


def parameters(checkpoint: Path) -> int:
    weights = torch.load(checkpoint, map_location="cpu", weights_only=False)["network_weights"]
    # stock PlainConvUNet stores its encoder twice (decoder.encoder.* is the same module)
    return sum(v.numel() for k, v in weights.items()
               if not k.startswith("decoder.encoder.") and v.is_floating_point())


def epoch_seconds(run_folder: Path) -> list[float]:
    times = []
    for log in sorted(run_folder.glob("training_log_*.txt")):
        times += [float(m.group(1)) for m in _EPOCH_TIME.finditer(log.read_text(errors="replace"))]
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="the benchmark's --out folder")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    args = parser.parse_args()
    report = json.loads((args.out / "report" / "benchmark.json").read_text())
    iterations = report["settings"]["budget"]["finetune_iterations"]
    rows = []
    for key, run in sorted(report["runs"].items()):
        folder = Path(run["run_folder"])
        times = epoch_seconds(folder)
        rows.append({"run": key, "arm": run["arm"],
                     "network": str(run.get("network_class", "")).rsplit(".", 1)[-1],
                     "plans": run.get("plans_name"),
                     "parameters": parameters(folder / "checkpoint_final.pth"),
                     "median_epoch_s": statistics.median(times) if times else None,
                     "s_per_iteration": statistics.median(times) / iterations if times else None,
                     "mean_dice": run["mean_dice"],
                     "dice_per_class": {c: statistics.fmean(v[c] for v in run["dice"].values())
                                        for c in next(iter(run["dice"].values()))}})
    print("| run | network (plans) | parameters | s/epoch | s/iteration | mean Dice | Dice per class |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        per_class = ", ".join(f"{c}: {v:.3f}" for c, v in r["dice_per_class"].items())
        print(f"| {r['run']} | {r['network']} ({r['plans']}) | {r['parameters'] / 1e6:.2f} M | "
              f"{r['median_epoch_s']:.1f} | {r['s_per_iteration']:.2f} | {r['mean_dice']:.3f} | "
              f"{per_class} |")
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
