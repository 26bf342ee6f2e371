"""Bar 3 on 763 over five seeds, runs of several folders paired by seed: the benchmark's own ``aggregate``.

Runs are deterministic (pretraining losses and probe repeat to the digit across sessions, and each seed's
training cases follow from the seed alone), so a seed's scratch and joint runs of different folders share
training cases and fine-tuning seed.

- 2 labeled cases: scratch seeds 0-1 from session 36 (scratch_session36_benchmark.json), joint seeds 0-1 from
  session 37 (joint_L2_session37_runs.json), both arms of seeds 2-4 from session 38's folder::

    python merge_five_seeds.py 2 bar3_session38_L2_seeds2-4_benchmark.json > bar3_L2_five_seeds_session38.json

- 4 labeled cases: scratch from session 36 (precondition_benchmark.json), joint from session 38's folder::

    python merge_five_seeds.py 4 bar3_session38_L4_joint_benchmark.json > bar3_L4_five_seeds_session38.json

- 1 labeled case, a second pretraining seed (``--seed 1``, session 41): scratch from session 37
  (bar3_session37_benchmark.json, the same cases and fine-tuning seeds), joint from the ``--seed 1``
  folder; the output adds ``pretraining_seeds``: each fine-tuning seed's gain under pretraining seeds 0
  (session 37) and 1, their difference (the pretraining's own spread) and the gain averaged over both, with
  its bootstrap interval over the five fine-tuning seeds::

    python merge_five_seeds.py 1 bar3_session41_L1_p1_benchmark.json > bar3_L1_p1_five_seeds_session41.json
"""
import json
import sys
from pathlib import Path

from nnssl_joint.experiments.benchmark import aggregate, bootstrap_interval, spread

res = Path(__file__).resolve().parent
labeled, folder_report = int(sys.argv[1]), Path(sys.argv[2])
runs: dict = {}
if labeled == 2:
    s36 = json.loads((res / "scratch_session36_benchmark.json").read_text())["runs"]
    runs.update({k: v for k, v in s36.items() if k in ("scratch/L2_s0", "scratch/L2_s1")})
    runs.update(json.loads((res / "joint_L2_session37_runs.json").read_text()))
elif labeled == 1:
    s37 = json.loads((res / "bar3_session37_benchmark.json").read_text())["runs"]
    runs.update({k: v for k, v in s37.items() if k.startswith("scratch/L1_")})
else:
    s36 = json.loads((res / "precondition_benchmark.json").read_text())["runs"]
    runs.update({k: v for k, v in s36.items() if k.startswith(f"scratch/L{labeled}_")})
here = json.loads(folder_report.read_text())["runs"]
runs.update({k: v for k, v in here.items() if k.split("/")[1].startswith(f"L{labeled}_") and k not in runs})
classes = {"1": "liver_like", "2": "kidney_like"}
seeds = sorted({int(k.split("_s")[1]) for k in runs})
summary = aggregate(runs, ["scratch", "joint"], [labeled], seeds, classes)
out = {"runs_used": sorted(runs), "summary": summary}
if labeled == 1:
    def gains(joint_runs: dict) -> list[float]:
        return [100.0 * (joint_runs[f"joint/L1_s{s}"]["mean_dice"] - runs[f"scratch/L1_s{s}"]["mean_dice"])
                for s in seeds]

    g0, g1 = gains(s37), gains(runs)
    both = [(a + b) / 2 for a, b in zip(g0, g1)]
    change = [b - a for a, b in zip(g0, g1)]
    out["pretraining_seeds"] = {
        "gain_points_pretraining_seed_0": g0, "gain_points_pretraining_seed_1": g1,
        "seed_1_minus_seed_0_points": {**spread(change), "per_seed": change},
        "gain_points_mean_of_both": {**spread(both), "ci95": bootstrap_interval(both), "per_seed": both,
                                     "wins": f"{sum(v > 0 for v in both)}/{len(both)}"}}
print(json.dumps(out, indent=1))
