"""Compare pretraining arms (configurations pretrained with several seeds) on ``nnssl_joint probe`` results.

    python scripts/probe_arms.py probe_intra/probe.json probe_joint/probe.json \
        --arm 2D-only='intra_s*' --arm joint='joint_s*' [--readout logistic] [--class K] [--json out.json]

Each ``--arm NAME=PATTERN`` groups the probed weights whose names (``--weights NAME=PATH`` of the probe)
match the shell-style pattern. With one arm, one of the files must hold random initialisations
(``--random-seeds``); with two or more, files without them give the arm - arm comparisons alone.
Prints a markdown table (arm - random, and every later arm minus every earlier one, in Dice points with
bootstrap 95% intervals over pretraining seeds, random initialisations and test cases) and, with ``--json``,
writes the numbers. See :mod:`nnssl_joint.probe.arms` and docs/probe.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nnssl_joint.errors import NnsslJointError
from nnssl_joint.probe.arms import (
    ARM_BOOTSTRAP_SAMPLES,
    compare_arms,
    group_arms,
    load_probe_runs,
    render_table,
)


def _arm(text: str) -> tuple[str, str]:
    name, sep, pattern = text.partition("=")
    if not sep or not name or not pattern:
        raise argparse.ArgumentTypeError(f"--arm takes NAME=PATTERN (e.g. joint='joint_s*'), got {text!r}")
    return name, pattern


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("probes", nargs="+", type=Path, help="probe.json files of nnssl_joint probe")
    parser.add_argument("--arm", action="append", type=_arm, required=True, metavar="NAME=PATTERN")
    parser.add_argument("--readout", choices=("logistic", "knn"), default="logistic")
    parser.add_argument("--class", dest="label_class", type=int, default=None, metavar="K",
                        help="compare the Dice of foreground class K (1 = the first foreground label) "
                        "instead of each case's mean over classes; cases without the class are left out")
    parser.add_argument("--samples", type=int, default=ARM_BOOTSTRAP_SAMPLES)
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap draws")
    parser.add_argument("--json", type=Path, default=None, help="write the numbers here")
    args = parser.parse_args(argv)
    try:
        weights, random, cases = load_probe_runs(args.probes, args.readout, args.label_class,
                                                 require_random=len(args.arm) < 2)
        arms = group_arms(weights, dict(args.arm))
    except NnsslJointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    result = compare_arms(weights, random, arms, samples=args.samples, seed=args.seed)
    result["readout"] = args.readout
    result["label_class"] = args.label_class
    result["probes"] = [str(p) for p in args.probes]
    result["test_cases"] = cases
    print(render_table(result))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
