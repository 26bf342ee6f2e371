"""Benchmark: wall time of ``nnssl_joint probe`` on the demo's labeled task (Dataset503) for the random
baseline and the demo's pretraining runs. Prints JSON (the probe's table goes to stderr).

    python scripts/bench_probe.py --demo-out demo_output [--runs joint intra] [--random-seeds 5]
        [--threads 2] [--out DIR]

``--demo-out`` is a finished (or at least pretrained and downstream-planned) demo folder: its raw and
preprocessed folders become nnUNet_raw / nnUNet_preprocessed, its pretraining run folders are probed.
OMP_WAIT_POLICY=PASSIVE is set before torch loads (busy-waiting OpenMP threads made the probe 4x
slower on a shared 2-core machine).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DEMO_TARGET = 503
DEMO_PRETRAIN_DATASET = "Dataset900_JointPretrain"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo-out", required=True, type=Path, help="the demo's --out folder")
    parser.add_argument("--runs", nargs="*", default=["intra", "joint"],
                        help="pretraining runs of the demo to probe")
    parser.add_argument("--random-seeds", type=int, default=5)
    parser.add_argument("--fit-cases", type=int, default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="folder for probe.json/md/png")
    args = parser.parse_args(argv)

    demo = args.demo_out.resolve()
    os.environ.update(nnUNet_raw=str(demo / "raw"), nnUNet_preprocessed=str(demo / "preprocessed"),
                      nnUNet_results=str(demo / "results"))
    import torch

    from nnssl_joint.naming import pretrain_run_folder
    from nnssl_joint.probe.run import run_probe

    torch.set_num_threads(args.threads)
    weights = [str(pretrain_run_folder(demo / "results" / f"pretrain_{run}", DEMO_PRETRAIN_DATASET))
               for run in args.runs]
    start = time.perf_counter()
    report = run_probe(weights, DEMO_TARGET, fit_cases=args.fit_cases, random_seeds=args.random_seeds,
                       out=args.out, stream=sys.stderr)
    seconds = time.perf_counter() - start
    summary = {
        "seconds": round(seconds, 1), "threads": args.threads, "target": report["target"]["dataset"],
        "fit_cases": report["target"]["fit_cases"], "test_cases": report["target"]["test_cases"],
        "random": ({r: report["random"]["dice"][r]["mean"] for r in ("logistic", "knn")}
                   if "random" in report else None),
        "weights": {res["name"]: {"source": res["source"], "linear_dice": res["dice"]["logistic"]["mean"],
                                  "knn_dice": res["dice"]["knn"]["mean"], "vs_random": res.get("vs_random"),
                                  "seconds": res["seconds"]} for res in report["weights"]},
        "seconds_per_weights": {res["name"]: res["seconds"]
                                for res in report["random_runs"] + report["weights"]},
    }
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":  # nnU-Net's preprocessing may start worker processes with spawn
    sys.exit(main())
