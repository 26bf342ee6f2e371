"""Networks of a finished benchmark side by side: parameters, seconds per epoch and per training
iteration, Dice. For issue 16's comparison of the plugin's networks with stock nnU-Net at the same budget.

    python scripts/bench_networks.py BENCHMARK_OUT [--json out.json]
    python scripts/bench_networks.py --plans PLANS.json [PLANS.json ...] -c 3d_fullres [--iterations 5]

The first form reads OUT/report/benchmark.json and every run's checkpoint_final.pth and nnU-Net training
log. Seconds per iteration are nnU-Net's logged epoch time (training iterations plus the validation
iterations) divided by the training iterations, so they slightly overstate the training step alone.

The second form needs no training run: it builds each plans file's network for configuration ``-c`` as
nnU-Net does (deep supervision on), counts the FLOPs of one forward + backward pass
(``torch.utils.flop_counter``: convolutions and matrix products; independent of the machine's load) and
times forward + backward + SGD step on random data of the plans' batch and patch size (median and
minimum of ``--iterations`` after one untimed step; on a shared machine the minimum is the steadier; no
data loading or augmentation, so a lower bound of nnU-Net's iteration time), for networks too slow to
train here.

Parameters are counted once per tensor: nnU-Net's blocks register each convolution twice
(``conv`` and ``all_modules.0``) and stock ``PlainConvUNet`` its encoder a second time as
``decoder.encoder``, so summing the state_dict would double-count them.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path

import torch

_EPOCH_TIME = re.compile(r"Epoch time: ([0-9.]+) s")


def count_unique(tensors) -> int:
    """Elements of the floating-point tensors, each storage region counted once (shared tensors, e.g. a
    module registered under two names, share their storage, also after ``torch.save``/``torch.load``)."""
    seen, total = set(), 0
    for v in tensors:
        if not v.is_floating_point():
            continue
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
        if key not in seen:
            seen.add(key)
            total += v.numel()
    return total


def parameters(checkpoint: Path) -> int:
    weights = torch.load(checkpoint, map_location="cpu", weights_only=False)["network_weights"]
    return count_unique(weights.values())


def time_plans(plans_file: Path, configuration: str, iterations: int) -> dict:
    """Parameters and seconds per forward + backward + SGD step of a plans file's network (random data of
    the plans' batch and patch size, cross-entropy on every deep-supervision output)."""
    import time

    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    plans = json.loads(plans_file.read_text())
    cfg = plans["configurations"][configuration]
    arch = cfg["architecture"]
    torch.manual_seed(0)
    network = get_network_from_plans(arch["network_class_name"], arch["arch_kwargs"],
                                     arch["_kw_requires_import"], 1, 4, allow_init=True,
                                     deep_supervision=True)
    optimizer = torch.optim.SGD(network.parameters(), 1e-2, momentum=0.99, nesterov=True)
    x = torch.randn(cfg["batch_size"], 1, *cfg["patch_size"])
    from torch.utils.flop_counter import FlopCounterMode

    times, flops = [], None
    for i in range(iterations + 1):
        counter = FlopCounterMode(display=False) if i == 0 else None
        start = time.perf_counter()
        if counter is not None:
            counter.__enter__()
        outputs = network(x)
        outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
        loss = sum(torch.nn.functional.cross_entropy(o, torch.zeros(o.shape[0], *o.shape[2:],
                                                                    dtype=torch.long))
                   for o in outputs)
        optimizer.zero_grad()
        loss.backward()
        if counter is not None:
            counter.__exit__(None, None, None)
            flops = counter.get_total_flops()
        optimizer.step()
        if i:  # the first step allocates (and counts FLOPs); not timed
            times.append(time.perf_counter() - start)
    return {"plans": str(plans_file), "plans_name": plans.get("plans_name"), "configuration": configuration,
            "network": arch["network_class_name"].rsplit(".", 1)[-1], "batch_size": cfg["batch_size"],
            "patch_size": cfg["patch_size"], "parameters": count_unique(network.state_dict().values()),
            "gflop_per_iteration": flops / 1e9,
            "s_per_iteration": statistics.median(times), "s_per_iteration_min": min(times),
            "threads": torch.get_num_threads()}


def epoch_seconds(run_folder: Path) -> list[float]:
    times = []
    for log in sorted(run_folder.glob("training_log_*.txt")):
        times += [float(m.group(1)) for m in _EPOCH_TIME.finditer(log.read_text(errors="replace"))]
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, nargs="?", help="the benchmark's --out folder")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    parser.add_argument("--plans", type=Path, nargs="+", default=None,
                        help="time these plans files' networks instead of reading a benchmark")
    parser.add_argument("-c", "--configuration", default="3d_fullres",
                        help="with --plans (default 3d_fullres)")
    parser.add_argument("--iterations", type=int, default=5, help="with --plans: timed steps (default 5)")
    args = parser.parse_args()
    if args.plans:
        rows = [time_plans(p, args.configuration, args.iterations) for p in args.plans]
        print("| plans | network | batch x patch | parameters | GFLOP/iteration (fwd+bwd) "
              "| s/iteration (fwd+bwd+step), median | min | threads |")
        print("|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['plans_name']} | {r['network']} | {r['batch_size']} x {r['patch_size']} | "
                  f"{r['parameters'] / 1e6:.2f} M | {r['gflop_per_iteration']:.1f} | "
                  f"{r['s_per_iteration']:.2f} | "
                  f"{r['s_per_iteration_min']:.2f} | {r['threads']} |")
        if args.json is not None:
            args.json.write_text(json.dumps(rows, indent=2) + "\n")
        return
    if args.out is None:
        parser.error("give a benchmark's --out folder or --plans")
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
