"""Benchmark: the slice attention of f_inter (DeformableSliceAttention) against full self-attention.

All methods and slice counts N run in one process, forward + backward of ``out.square().mean()``,
repeats interleaved across methods (so a busy machine slows all of them alike), the methods in a
different order every repeat (a fixed shuffle per repeat: in one fixed order a method always runs right
after the same one, e.g. after the one whose freed memory the allocator has just returned to the
system, and pays the page faults of growing the heap again every time); reported: the median.

Methods (same d, heads, batch; the four first share the projections' shapes):
  deformable    DeformableSliceAttention, attention="deformable": ceil(N / r) keys per head at learned
                positions (offsets non-zero), continuous relative-position bias
  auto          the same module and weights, attention="auto": full below AUTO_FULL_BELOW slices
  full_relbias  the same module and weights, attention="full": all N keys + the same bias
  full          plain multi-head softmax attention over all N slices, no bias (the issue's baseline)
  full_sdpa     the same as full through torch's fused scaled_dot_product_attention

Time: wall-clock milliseconds; on CPU also the process CPU time (less sensitive to other jobs on the
machine). On CUDA every step is synchronised and timed with CUDA events.

Memory of one forward + backward (after a warm-up step), MiB:
  cuda  torch.cuda.max_memory_allocated above the allocation before the step (in process).
  cpu   the peak of live tensor bytes above the start of the step, from torch.profiler's memory
        records (profile_memory=True): the net allocation of every operator, in start order, summed.
        Deterministic; operator granularity (a temporary allocated and freed inside one kernel is not
        seen), tensors only (no allocator slack). With --rss also, per (method, N), the median over
        --memory-repeats fresh subprocesses of how far the peak resident set size rises above the
        current one during one step (VmHWM reset through /proc/self/clear_refs; ru_maxrss alone is
        inherited across fork + exec): process level, includes allocator slack, scatters by some MiB.

Throughput and utilisation: slices/s = batch * N / time. Model FLOPs are counted analytically (matrix
products only: query and output projections 2 * 2 B N d (heads * dim_head), key and value projections
2 * 2 B K d (heads * dim_head), scores and weighted sum 2 * 2 B heads N K dim_head with K = N (full) or
ceil(N / r) (deformable: keys and values come from the ceil(N / r) interpolated tokens of each group);
backward counted as twice the forward; the bias, softmax and offset network are left out). Model FLOPs
utilisation = model FLOP/s / peak FLOP/s, the peak from --peak-tflops or, on CUDA, from a small table of
FP32 peaks by device name.

Usage:
  python scripts/bench_attention.py [--out bench.json]                 # CPU, the configuration below
  python scripts/bench_attention.py --device cuda --sizes 16 64 256 1024 4096 --out bench_cuda.json
  python scripts/bench_attention.py --preset gpu                       # d, heads, r, k of a preset
Default configuration: d=256, 8 heads x 32, batch 2, r=4, k=6 (the gpu preset's r and k at 2/5 of
its width, d=640 with 8 x 64 heads; the cpu preset has r=2).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import random
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from nnssl_joint.models import DeformableSliceAttention

METHODS = ("deformable", "auto", "full_relbias", "full", "full_sdpa")
#: dense FP32 (no tensor cores) peak TFLOP/s by a substring of torch.cuda.get_device_name()
FP32_PEAK_TFLOPS = {"H200": 67.0, "H100": 67.0, "A100": 19.5, "L40S": 91.6, "A10": 31.2, "V100": 15.7,
                    "T4": 8.1, "RTX 4090": 82.6, "RTX 3090": 35.6}


class FullSelfAttention(nn.Module):
    """Baseline: multi-head softmax attention over all slices, same projections as ours."""

    def __init__(self, dim: int, heads: int, dim_head: int, fused: bool = False) -> None:
        super().__init__()
        self.heads, self.dim_head, self.fused = heads, dim_head, fused
        inner = heads * dim_head
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.to_out = nn.Linear(inner, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        q, k, v = (proj(x).view(b, n, self.heads, self.dim_head).transpose(1, 2)
                   for proj in (self.to_q, self.to_k, self.to_v))
        if self.fused:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            out = (q @ k.transpose(-1, -2) / math.sqrt(self.dim_head)).softmax(dim=-1) @ v
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


def build(method: str, args: argparse.Namespace) -> nn.Module:
    torch.manual_seed(0)
    if method in ("full", "full_sdpa"):
        return FullSelfAttention(args.dim, args.heads, args.dim_head, fused=method == "full_sdpa")
    mode = {"deformable": "deformable", "auto": "auto", "full_relbias": "full"}[method]
    module = DeformableSliceAttention(args.dim, args.heads, args.dim_head, downsample=args.downsample,
                                      offset_kernel=args.offset_kernel, attention=mode)
    with torch.no_grad():  # non-zero offsets: the timed path is the trained one
        module.offset_net[-1].weight.normal_(0.0, 0.1)
    return module


def attention_keys(method: str, n: int, args: argparse.Namespace) -> int:
    """Keys per query that ``method`` attends to at N slices."""
    auto_deformable = method == "auto" and n >= DeformableSliceAttention.AUTO_FULL_BELOW
    deformable = method == "deformable" or auto_deformable
    return -(-n // args.downsample) if deformable else n


def model_flops(method: str, n: int, args: argparse.Namespace) -> int:
    """Matrix-product FLOPs of one forward + backward (see the module docstring)."""
    inner = args.heads * args.dim_head
    keys = attention_keys(method, n, args)
    # queries and output on all N slices; keys and values on the tokens attended to (deformable: each group
    # projects its ceil(N / r) interpolated tokens, so K/V cost ceil(N / r) rows in all, not N)
    projections = 2 * 2 * args.batch * (n + keys) * args.dim * inner
    attention = 2 * 2 * args.batch * args.heads * n * keys * args.dim_head
    return 3 * (projections + attention)


def step(module: nn.Module, x: Tensor) -> None:
    module.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    module(x).square().mean().backward()


def _timer(device: torch.device) -> Callable[[Callable[[], None]], tuple[float, float]]:
    """Returns a function that runs a step and gives (wall ms, CPU ms; CPU is NaN on CUDA)."""
    if device.type == "cuda":
        def timed(run: Callable[[], None]) -> tuple[float, float]:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
            run()
            end.record()
            torch.cuda.synchronize(device)
            return start.elapsed_time(end), math.nan
        return timed

    def timed(run: Callable[[], None]) -> tuple[float, float]:
        wall, cpu = time.perf_counter(), time.process_time()
        run()
        return 1000 * (time.perf_counter() - wall), 1000 * (time.process_time() - cpu)
    return timed


def time_all(sizes: Sequence[int], args: argparse.Namespace, device: torch.device
             ) -> tuple[dict[str, dict[int, float]], dict[str, dict[int, float]]]:
    timed = _timer(device)
    modules = {m: build(m, args).to(device) for m in METHODS}
    wall = {m: {} for m in METHODS}
    cpu = {m: {} for m in METHODS}
    for n in sizes:
        x = torch.randn(args.batch, n, args.dim, device=device)
        samples = {m: [] for m in METHODS}
        for m in METHODS:
            step(modules[m], x)  # warm-up
        for repeat in range(args.repeats):
            order = list(METHODS)
            random.Random(repeat).shuffle(order)
            for m in order:
                samples[m].append(timed(lambda m=m, x=x: step(modules[m], x)))
        for m in METHODS:
            wall[m][n] = statistics.median(s[0] for s in samples[m])
            cpu[m][n] = statistics.median(s[1] for s in samples[m])
    return wall, cpu


def cuda_memory_mib(method: str, n: int, args: argparse.Namespace, device: torch.device) -> float:
    module = build(method, args).to(device)
    x = torch.randn(args.batch, n, args.dim, device=device)
    step(module, x)
    module.zero_grad(set_to_none=True)
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step(module, x)
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2 ** 20


def cpu_tensor_memory_mib(method: str, n: int, args: argparse.Namespace) -> float:
    module = build(method, args)
    x = torch.randn(args.batch, n, args.dim)
    step(module, x)
    module.zero_grad(set_to_none=True)
    cpu = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=cpu, profile_memory=True) as prof:
        step(module, x)
    changes = sorted((event.time_range.start, event.cpu_memory_usage if event.name == "[memory]"
                      else event.self_cpu_memory_usage) for event in prof.events())
    live = peak = 0
    for _, change in changes:
        live += change
        peak = max(peak, live)
    return peak / 2 ** 20


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


def cpu_memory_in_subprocess(method: str, n: int, args: argparse.Namespace) -> float:
    command = [sys.executable, __file__, "--measure-memory", method, str(n), "--dim", str(args.dim),
               "--heads", str(args.heads), "--dim-head", str(args.dim_head), "--batch", str(args.batch),
               "--downsample", str(args.downsample), "--offset-kernel", str(args.offset_kernel),
               "--threads", str(args.threads)]
    result = subprocess.run(command, check=True, capture_output=True, text=True)
    return float(result.stdout.strip().splitlines()[-1])


def peak_tflops(args: argparse.Namespace, device: torch.device) -> tuple[float | None, str]:
    if args.peak_tflops is not None:
        return args.peak_tflops, "--peak-tflops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        tf32 = "on" if torch.backends.cuda.matmul.allow_tf32 else "off"
        for key, value in FP32_PEAK_TFLOPS.items():
            if key in name:
                return value, f"FP32 table entry {key!r} (TF32 matmul {tf32})"
    return None, "unknown: pass --peak-tflops"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[16, 64, 256, 1024])
    parser.add_argument("--preset", help="take dim, heads, dim_head, downsample, offset_kernel from a "
                        "preset (cpu, gpu or a JSON path); explicit flags below are then ignored")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--dim-head", type=int, default=32)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--downsample", type=int, default=4)
    parser.add_argument("--offset-kernel", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--peak-tflops", type=float, help="peak FLOP/s of the device for utilisation")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory measurement")
    parser.add_argument("--rss", action="store_true", help="CPU: also the peak RSS growth in subprocesses")
    parser.add_argument("--memory-repeats", type=int, default=3,
                        help="--rss: subprocesses per (method, N) for the median")
    parser.add_argument("--out", type=Path, help="also write the JSON report to this file")
    parser.add_argument("--measure-memory", nargs=2, metavar=("METHOD", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a visible CUDA GPU and a CUDA build of torch; here "
                     f"torch {torch.__version__} reports torch.cuda.is_available() = False. Run on a GPU "
                     "machine or leave out --device for the CPU benchmark")
    if min(args.sizes) < 1 or args.repeats < 1 or args.memory_repeats < 1:
        parser.error("--sizes, --repeats and --memory-repeats must be positive")
    if args.preset:
        from nnssl_joint.models.preset import load_preset
        preset = load_preset(args.preset)
        t = preset.transformer
        args.dim, args.heads, args.dim_head = preset.embedding_dim, t.heads, t.dim_head
        args.downsample, args.offset_kernel = t.downsample, t.offset_kernel
    return args


def _ratio(a: float, b: float) -> float:
    return round(a / b, 2) if b > 0 else math.nan


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.measure_memory:
        method, n = args.measure_memory
        print(peak_rss_growth_mib(method, int(n), args))
        return {}
    device = torch.device(args.device)
    sizes = sorted(set(args.sizes))
    wall, cpu = time_all(sizes, args, device)
    memory = None
    if not args.no_memory:
        def measure(method: str, n: int) -> float:
            if device.type == "cuda":
                return cuda_memory_mib(method, n, args, device)
            return cpu_tensor_memory_mib(method, n, args)
        memory = {m: {n: measure(m, n) for n in sizes} for m in METHODS}
    rss = None
    if args.rss and device.type == "cpu":
        rss = {m: {n: statistics.median(cpu_memory_in_subprocess(m, n, args)
                                        for _ in range(args.memory_repeats)) for n in sizes} for m in METHODS}
    peak, peak_source = peak_tflops(args, device)

    machine = f"{platform.machine()}, {torch.get_num_threads()} torch thread(s) of {_cpu_count()} CPUs"
    if device.type == "cuda":
        machine += f", {torch.cuda.get_device_name(device)}"
    report: dict = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join(["python scripts/bench_attention.py",
                             *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine,
        "config": {"dim": args.dim, "heads": args.heads, "dim_head": args.dim_head, "batch": args.batch,
                   "downsample": args.downsample, "offset_kernel": args.offset_kernel,
                   "preset": args.preset, "threads": args.threads, "repeats": args.repeats,
                   "device": args.device, "torch": torch.__version__, "dtype": "float32",
                   "rss_repeats": args.memory_repeats if rss is not None else None,
                   "auto_full_below": DeformableSliceAttention.AUTO_FULL_BELOW,
                   "memory": None if memory is None else (
                       "peak CUDA allocation above the allocation before one fwd+bwd (MiB)"
                       if device.type == "cuda" else
                       "peak live tensor bytes during one fwd+bwd, torch.profiler memory records (MiB)")},
        "time_ms_fwd_bwd": {m: {n: round(wall[m][n], 2) for n in sizes} for m in METHODS},
    }
    if device.type == "cpu":
        report["cpu_time_ms_fwd_bwd"] = {m: {n: round(cpu[m][n], 2) for n in sizes} for m in METHODS}
    if memory is not None:
        report["memory_mib"] = {m: {n: round(memory[m][n], 1) for n in sizes} for m in METHODS}
    if rss is not None:
        report["peak_rss_growth_mib"] = {m: {n: round(rss[m][n], 1) for n in sizes} for m in METHODS}
    report["slices_per_s"] = {m: {n: round(args.batch * n / (wall[m][n] / 1000), 1) for n in sizes}
                              for m in METHODS}
    report["model_gflop_fwd_bwd"] = {m: {n: round(model_flops(m, n, args) / 1e9, 4) for n in sizes}
                                     for m in METHODS}
    report["peak_tflops"] = {"value": peak, "source": peak_source}
    if peak:
        report["model_flops_utilisation"] = {
            m: {n: round(model_flops(m, n, args) / (wall[m][n] / 1000) / (peak * 1e12), 4) for n in sizes}
            for m in METHODS}
    ratios = {}
    for n in sizes:
        entry = {}
        for name, slow, fast in (("full_over_deformable", "full", "deformable"),
                                 ("full_over_auto", "full", "auto"),
                                 ("full_relbias_over_auto", "full_relbias", "auto"),
                                 ("full_sdpa_over_deformable", "full_sdpa", "deformable")):
            entry[name] = {"time": _ratio(wall[slow][n], wall[fast][n])}
            if device.type == "cpu":
                entry[name]["cpu_time"] = _ratio(cpu[slow][n], cpu[fast][n])
            if memory is not None:
                entry[name]["memory"] = _ratio(memory[slow][n], memory[fast][n])
        ratios[n] = entry
    report["ratios"] = ratios
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return report


def _cpu_count() -> int:
    import os
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


if __name__ == "__main__":
    main()
