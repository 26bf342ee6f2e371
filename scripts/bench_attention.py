"""CPU benchmark: DeformableSliceAttention vs ordinary full self-attention over slices.

Time: forward + backward, median of a few repeats, all configurations in this process.
Memory: each (method, N) runs once more in a fresh subprocess that records how far the peak resident
set size rises above the current one during one forward + backward (after building the module and
inputs and a warm-up at a tiny N). On Linux the peak (VmHWM) is reset to the current RSS through
/proc/self/clear_refs right before the step: ``ru_maxrss`` alone is not enough, because a child
inherits its parent's high-water mark across fork + exec. This is a process-level measure, so it
includes allocator overhead and the parameter gradients, not a per-tensor account.

Methods:
  deformable    DeformableSliceAttention (downsample r, learned offsets, relative-position bias)
  full          plain multi-head softmax attention over all N slices (no position bias)
  full_relbias  DeformableSliceAttention with r = 1 and no offsets: full attention + the same bias

Usage: python scripts/bench_attention.py [--sizes 64 256 1024] [--dim 256] [--batch 2]
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from nnssl_joint.models import DeformableSliceAttention

METHODS = ("deformable", "full", "full_relbias")


class FullSelfAttention(nn.Module):
    """Baseline: multi-head softmax attention over all slices, same projections as ours."""

    def __init__(self, dim: int, heads: int, dim_head: int) -> None:
        super().__init__()
        self.heads, self.dim_head = heads, dim_head
        inner = heads * dim_head
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.to_out = nn.Linear(inner, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        q, k, v = (proj(x).view(b, n, self.heads, self.dim_head).transpose(1, 2)
                   for proj in (self.to_q, self.to_k, self.to_v))
        attn = (q @ k.transpose(-1, -2) / math.sqrt(self.dim_head)).softmax(dim=-1)
        return self.to_out((attn @ v).transpose(1, 2).reshape(b, n, -1))


def build(method: str, args: argparse.Namespace) -> nn.Module:
    torch.manual_seed(0)
    if method == "full":
        return FullSelfAttention(args.dim, args.heads, args.dim_head)
    if method == "full_relbias":
        return DeformableSliceAttention(args.dim, args.heads, args.dim_head, downsample=1, use_offsets=False)
    module = DeformableSliceAttention(args.dim, args.heads, args.dim_head, downsample=args.downsample)
    with torch.no_grad():  # non-zero offsets: the timed path is the trained one
        module.offset_net[-1].weight.normal_(0.0, 0.1)
    return module


def step(module: nn.Module, x: Tensor) -> None:
    module.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    module(x).square().mean().backward()


def time_ms(method: str, n: int, args: argparse.Namespace) -> float:
    module = build(method, args)
    x = torch.randn(args.batch, n, args.dim)
    step(module, x)  # warm-up
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        step(module, x)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def peak_rss_growth_mib(method: str, n: int, args: argparse.Namespace) -> float:
    """Runs in a fresh subprocess (see ``--measure-memory``)."""
    module = build(method, args)
    step(module, torch.randn(args.batch, 8, args.dim))  # lazy initialisation at a tiny size
    x = torch.randn(args.batch, n, args.dim)
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # resets VmHWM to the current RSS
        before = _proc_status_kib("VmRSS")
        step(module, x)
        return (_proc_status_kib("VmHWM") - before) / 1024
    except OSError:  # no procfs: fall back to ru_maxrss (KiB on Linux), may read low in a child
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        step(module, x)
        return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"{field} missing from /proc/self/status")


def memory_in_subprocess(method: str, n: int, args: argparse.Namespace) -> float:
    command = [sys.executable, __file__, "--measure-memory", method, str(n), "--dim", str(args.dim),
               "--heads", str(args.heads), "--dim-head", str(args.dim_head), "--batch", str(args.batch),
               "--downsample", str(args.downsample), "--threads", str(args.threads)]
    result = subprocess.run(command, check=True, capture_output=True, text=True)
    return float(result.stdout.strip().splitlines()[-1])


def growth(values: dict[int, float], sizes: list[int]) -> dict[str, float]:
    """Ratio between consecutive sizes and the fitted exponent (value ~ N^exponent)."""
    out = {}
    for small, large in itertools.pairwise(sizes):
        out[f"x{large // small}_N_{small}_to_{large}"] = round(values[large] / max(values[small], 1e-9), 2)
    if len(sizes) > 1 and all(values[n] > 0 for n in sizes):
        logs_n = [math.log(n) for n in sizes]
        logs_v = [math.log(values[n]) for n in sizes]
        mean_n, mean_v = statistics.fmean(logs_n), statistics.fmean(logs_v)
        slope = sum((a - mean_n) * (b - mean_v) for a, b in zip(logs_n, logs_v)) / sum(
            (a - mean_n) ** 2 for a in logs_n)
        out["exponent"] = round(slope, 2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--dim-head", type=int, default=32)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--downsample", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--measure-memory", nargs=2, metavar=("METHOD", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    if args.measure_memory:
        method, n = args.measure_memory
        print(peak_rss_growth_mib(method, int(n), args))
        return

    sizes = sorted(args.sizes)
    times = {m: {n: time_ms(m, n, args) for n in sizes} for m in METHODS}
    memory = {m: {n: memory_in_subprocess(m, n, args) for n in sizes} for m in METHODS}
    report = {
        "config": {"dim": args.dim, "heads": args.heads, "dim_head": args.dim_head, "batch": args.batch,
                   "downsample": args.downsample, "threads": args.threads, "repeats": args.repeats,
                   "torch": torch.__version__, "device": "cpu",
                   "memory": "peak RSS above current RSS during one fwd+bwd, fresh subprocess (MiB)"},
        "time_ms_fwd_bwd": {m: {n: round(times[m][n], 2) for n in sizes} for m in METHODS},
        "peak_rss_growth_mib": {m: {n: round(memory[m][n], 1) for n in sizes} for m in METHODS},
        "full_over_deformable": {
            n: {"time": round(times["full"][n] / times["deformable"][n], 2),
                "memory": round(memory["full"][n] / max(memory["deformable"][n], 1e-9), 2)} for n in sizes},
        "growth_with_N": {m: {"time": growth(times[m], sizes), "memory": growth(memory[m], sizes)}
                          for m in METHODS},
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
