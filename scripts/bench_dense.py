"""Benchmark: what the dense term (``objective.lambda_dense``) adds to one step of the pretraining network.

One process, one thread by default, the ``cpu`` preset at the demo's self-configuration (48 px global views,
2 small views of 32 px, 16 2D items, 2 windows of 16 slices, K_2D = 34, K_3D = 4); every arm is the forward +
backward of the weighted loss of :class:`nnssl_joint.pretrain.model.JointSSLModel` on the same random batch
(data loading and the optimizer are not included), repeats interleaved across arms, the median reported.
Arms: the paper's joint objective (:data:`nnssl_joint.ssl.objective.PAPER_OBJECTIVE`, the defaults when the
recorded results were measured: no dense term, no contrastive volume term) and its 2D-only arm
(``lambda_intra_3d``, ``lambda_inter``, ``lambda_mask``, ``lambda_volume_contrast`` 0), each without the dense
term and with it at each stage in ``--stages``, and with ``--keys K`` also at each stage with the negatives
subsampled to K keys (``objective.dense_keys``); every arm states its whole objective, so the defaults (the
dense term and the contrastive volume term on since the twenty-third pass) do not change what is compared.
Prints JSON (and writes it with ``--out``).

Usage:
  python scripts/bench_dense.py [--stages 2 1] [--keys 2048] [--repeats 5] [--threads 1] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from nnssl_joint.data.augment import coordinate_maps
from nnssl_joint.models.preset import load_preset
from nnssl_joint.pretrain.model import JointSSLModel
from nnssl_joint.ssl.objective import PAPER_OBJECTIVE, ObjectiveConfig

#: the arms' objective without the dense term: the paper's (what the recorded results compare against)
JOINT = {**PAPER_OBJECTIVE, "lambda_dense": 0.0, "lambda_volume_contrast": 0.0}
TWO_D_ONLY = {**JOINT, "lambda_intra_3d": 0.0, "lambda_inter": 0.0, "lambda_mask": 0.0}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", type=int, nargs="+", default=[2, 1], help="dense_stage values to time")
    parser.add_argument("--keys", type=int, nargs="*", default=[],
                        help="dense_keys values to time at every stage as well (default: none)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per arm (after one warm-up)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--view", type=int, default=48, help="global view size (small views: 2/3 of it)")
    parser.add_argument("--batch-2d", type=int, default=16)
    parser.add_argument("--batch-3d", type=int, default=2)
    parser.add_argument("--slices", type=int, default=16)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.threads < 1:
        parser.error("--repeats and --threads must be >= 1")
    if any(s < 0 for s in args.stages):
        parser.error(f"--stages must be encoder stage indices >= 0, got {args.stages}")
    if any(k < 1 for k in args.keys):
        parser.error(f"--keys must be key counts >= 1, got {args.keys}")
    return args


def _batches(args: argparse.Namespace) -> tuple[dict, dict]:
    g = torch.Generator().manual_seed(0)
    view, small = args.view, (2 * args.view) // 3
    maps = coordinate_maps(view, view)
    slices = {"global_views": torch.randn(args.batch_2d, 2, 1, view, view, generator=g),
              "small_views": torch.randn(args.batch_2d, 2, 1, small, small, generator=g),
              "global_coords": maps[None, None].expand(args.batch_2d, 2, -1, -1, -1).clone()}
    volumes = {"views": torch.randn(args.batch_3d, 2, 1, args.slices, view, view, generator=g),
               "valid": torch.ones(args.batch_3d, args.slices, dtype=torch.bool),
               "coords": maps[None, None].flip(-1).expand(args.batch_3d, 2, -1, -1, -1).clone()}
    return slices, volumes


def arms(stages: list[int], keys: list[int] = ()) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for objective, base in (("joint", JOINT), ("2d_only", TWO_D_ONLY)):
        out[objective] = dict(base)
        for stage in stages:
            dense = {**base, "lambda_dense": 1.0, "dense_stage": stage}
            out[f"{objective}+dense_stage{stage}"] = dense
            for k in keys:
                out[f"{objective}+dense_stage{stage}_keys{k}"] = {**dense, "dense_keys": k}
    return out


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    slices, volumes = _batches(args)
    models = {}
    for name, values in arms(args.stages, args.keys).items():
        objective = ObjectiveConfig(num_prototypes_2d=34, num_prototypes_3d=4, **values)
        torch.manual_seed(0)
        models[name] = (JointSSLModel(load_preset("cpu"), 1, objective), objective.stage_at(0))
    times: dict[str, list[float]] = {name: [] for name in models}
    for repeat in range(args.repeats + 1):
        for name, (model, stage) in models.items():
            start = time.perf_counter()
            out = model(slices, volumes if stage.needs_volumes else None, 10_000, stage)
            sum(out[term] * weight for term, weight in stage.weights.items()).backward()
            model.zero_grad(set_to_none=True)
            if repeat:  # the first pass is a warm-up
                times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(values) for name, values in times.items()}
    ratios = {name: median[name] / median[name.split("+")[0]] for name in median if "+" in name}
    report = {
        "benchmark": "dense term cost per network step (forward + backward)",
        "date": datetime.datetime.now().isoformat(timespec="minutes"),
        "machine": f"{platform.machine()}, {args.threads} torch thread(s)",
        "command": "python scripts/bench_dense.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "seconds_median": {k: round(v, 4) for k, v in median.items()},
        "ratio_to_same_objective_without_dense": {k: round(v, 3) for k, v in ratios.items()},
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")
    return report


if __name__ == "__main__":
    main()
