"""Bar 3 on 763 at 2 labeled cases over five seeds: seeds 0-1 from sessions 36 (scratch) and 37 (joint),
seeds 2-4 from session 38's folder (both arms); runs are deterministic (pretraining losses repeat to
the digit), so the pairs share training cases and fine-tuning seed. Prints the benchmark's own aggregate.

    python merge_l2_five_seeds.py bar3_session38_L2_seeds2-4_benchmark.json \
        > bar3_L2_five_seeds_session38.json
"""
import json
import sys
from pathlib import Path

from nnssl_joint.experiments.benchmark import aggregate

res = Path(__file__).resolve().parent
runs = {}
s36 = json.loads((res / "scratch_session36_benchmark.json").read_text())["runs"]
runs.update({k: v for k, v in s36.items() if k in ("scratch/L2_s0", "scratch/L2_s1")})
runs.update(json.loads((res / "joint_L2_session37_runs.json").read_text()))
here = json.loads(Path(sys.argv[1]).read_text())["runs"]
runs.update({k: v for k, v in here.items() if k.endswith(("L2_s2", "L2_s3", "L2_s4"))})
classes = {"1": "liver_like", "2": "kidney_like"}
summary = aggregate(runs, ["scratch", "joint"], [2], list(range(5)), classes)
print(json.dumps({"runs_used": sorted(runs), "summary": summary}, indent=1))
