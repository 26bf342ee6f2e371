"""``nnssl_joint probe``: what frozen pretrained weights know about a labeled task, against nnU-Net's
random initialisation.

    nnssl_joint probe --weights RUN_FOLDER pretrained_for_3d_fullres.pth ... --target 503 \
        [-c 3d_fullres] [--fit-cases N | --fit CASE ...] [--random-seeds 5] [--out DIR]

For every weights file and ``--random-seeds`` random initialisations: the dense linear probe and kNN
read-out (:mod:`nnssl_joint.probe.readout`) on the target's fit/test cases (:mod:`nnssl_joint.probe.data`)
and the label-free diagnostics (:mod:`nnssl_joint.probe.diagnostics`). Each file's mean Dice is compared
with the random mean, with a bootstrap 95% interval that resamples test cases (paired) and random seeds.
Writes ``probe.json``, ``probe.md`` and ``probe.png`` into ``--out`` and prints the table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from nnssl_joint.errors import NnsslJointError

READOUTS = ("logistic", "knn")
DIAGNOSTIC_COLUMNS = (
    ("rankme_slices", "RankMe e"), ("rankme_z", "RankMe Z"), ("retrieval_top1", "retrieval@1"),
    ("slice_position_r2", "pos. R^2"), ("prototype_entropy_2d", "H 2D"), ("prototype_entropy_3d", "H 3D"),
    ("z_mean_pairwise_cosine", "cos Z"),
)
BOOTSTRAP_SAMPLES = 2000
#: ``--statistics``: InstanceNorm statistics as the target's network takes them, or per slice
STATISTICS = ("network", "slice")


def summarize_dice(per_case: dict[str, list[float]]) -> dict[str, Any]:
    """Per-class mean over test cases (NaN-aware), their mean, and each case's mean over classes."""
    matrix = np.array(list(per_case.values()), dtype=np.float64)
    with warnings.catch_warnings():  # all-NaN columns (a class absent everywhere) stay NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        per_class = np.nanmean(matrix, axis=0)
        per_case_mean = np.nanmean(matrix, axis=1)
        mean = float(np.nanmean(per_class))
    return {"per_class": per_class.tolist(), "mean": mean, "per_case_mean": per_case_mean.tolist()}


def bootstrap_difference(weights_cases: np.ndarray, random_cases: np.ndarray,
                         samples: int = BOOTSTRAP_SAMPLES, seed: int = 0) -> dict[str, float]:
    """mean(weights) - mean(random) and its percentile 95% interval, resampling test cases (the same
    cases for both sides) and random seeds with replacement. ``weights_cases`` (cases,),
    ``random_cases`` (seeds, cases)."""
    rng = np.random.default_rng(seed)
    n_seeds, n_cases = random_cases.shape
    diffs = np.empty(samples)
    for i in range(samples):
        cases = rng.integers(0, n_cases, n_cases)
        seeds = rng.integers(0, n_seeds, n_seeds)
        diffs[i] = weights_cases[cases].mean() - random_cases[np.ix_(seeds, cases)].mean()
    low, high = np.percentile(diffs, [2.5, 97.5])
    return {"difference": float(weights_cases.mean() - random_cases.mean()), "ci_low": float(low),
            "ci_high": float(high)}


def _mean_std(values: Sequence[float]) -> dict[str, float]:
    arr = np.array([v for v in values if v is not None and np.isfinite(v)], dtype=np.float64)
    if not len(arr):
        return {"mean": float("nan"), "std": float("nan")}
    return {"mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if len(arr) > 1 else 0.0}


def probe_one(weights: Any, target: Any, n_slices: int, view_size: int, settings: Any) -> dict[str, Any]:
    """Dense read-outs + diagnostics of one :class:`ProbeWeights` on a loaded target."""
    from nnssl_joint.probe.diagnostics import label_free_diagnostics
    from nnssl_joint.probe.readout import dense_probe

    start = time.perf_counter()
    dense = dense_probe(weights.encoder, target.fit, target.test, target.num_classes,
                        weights.preset.encoder.total_stride, settings,
                        context=volume_context_parts(weights, settings))
    diagnostics = label_free_diagnostics(weights, target.fit, target.test, n_slices, view_size, settings.seed)
    return {"name": weights.name, "kind": weights.kind, "source": weights.source, "seed": weights.seed,
            "dice": {r: {"per_case": dense[r], **summarize_dice(dense[r])} for r in READOUTS},
            "fit": dense["fit"], "diagnostics": diagnostics, "seconds": round(time.perf_counter() - start, 2)}


def volume_context_parts(weights: Any, settings: Any) -> tuple[Any, Any] | None:
    """(g, f_inter) of ``weights`` for the volume-context read-out (``settings.volume_context`` > 0), else
    None; an error naming the file when it holds no slice Transformer."""
    if not getattr(settings, "volume_context", 0):
        return None
    if weights.slice_embedding is None or weights.slice_transformer is None:
        from nnssl_joint.probe.weights import ProbeWeightsError

        raise ProbeWeightsError(
            f"{weights.source} holds no slice embedding and slice Transformer (f_inter), which "
            "--volume-context reads; give the pretraining run folder, its checkpoint, or "
            "pretrained_for_3d_fullres.pth instead of a 2D export")
    return weights.slice_embedding, weights.slice_transformer


def compare_to_random(results: list[dict[str, Any]], randoms: list[dict[str, Any]],
                      seed: int = 0) -> dict[str, Any]:
    """Random mean ± std of every number, and each file's Dice difference to the random mean."""
    baseline: dict[str, Any] = {"seeds": [r["seed"] for r in randoms], "dice": {}, "diagnostics": {}}
    for r in READOUTS:
        per_class = np.array([x["dice"][r]["per_class"] for x in randoms])
        baseline["dice"][r] = {"mean": _mean_std([x["dice"][r]["mean"] for x in randoms]),
                               "per_class_mean": per_class.mean(0).tolist(),
                               "per_class_std": (per_class.std(0, ddof=1) if len(per_class) > 1
                                                 else np.zeros(per_class.shape[1])).tolist()}
    keys = sorted({k for x in randoms for k, v in x["diagnostics"].items() if isinstance(v, float)})
    for k in keys:
        baseline["diagnostics"][k] = _mean_std([x["diagnostics"].get(k) for x in randoms])
    for res in results:
        res["vs_random"] = {}
        for r in READOUTS:
            random_cases = np.array([x["dice"][r]["per_case_mean"] for x in randoms])
            res["vs_random"][r] = bootstrap_difference(np.array(res["dice"][r]["per_case_mean"]),
                                                       random_cases, seed=seed)
    return baseline


def statistics_phrase(settings: dict[str, Any]) -> str:
    """How the encoder's InstanceNorms took their statistics in a probe (its ``settings`` record)."""
    slices = int(settings.get("norm_slices", 1))
    if slices > 1:
        phrase = f"encoder statistics over groups of {slices} consecutive slices, as the target's network"
    else:
        phrase = "encoder statistics per slice"
    context = int(settings.get("volume_context", 0))
    if context:
        dims = int(settings.get("volume_context_dims", 0))
        what = (f"the first {dims} principal components (over the fit cases' slices) of f_inter's per-slice "
                "output" if dims else "f_inter's per-slice output")
        phrase += (f"; with {what} (over groups of {context} consecutive slices) "
                   "appended to every pixel's features")
    return phrase


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def format_table(report: dict[str, Any]) -> str:
    """Markdown table: one row for the random baseline (mean ± std), one per weights file."""
    head = ["weights", "linear Dice", "kNN Dice", "linear - random [95% CI]", "kNN - random [95% CI]",
            *[label for _, label in DIAGNOSTIC_COLUMNS], "seconds"]
    rows = []
    base = report.get("random")
    if base:
        n = len(base["seeds"])
        row = [f"random ({n} seed{'s' if n != 1 else ''})"]
        row += [f"{_fmt(base['dice'][r]['mean']['mean'])} ± {_fmt(base['dice'][r]['mean']['std'])}"
                for r in READOUTS]
        row += ["", ""]
        for key, _ in DIAGNOSTIC_COLUMNS:
            d = base["diagnostics"].get(key)
            row.append(f"{_fmt(d['mean'])} ± {_fmt(d['std'])}" if d else "-")
        row.append(_fmt(sum(x["seconds"] for x in report["random_runs"]), 1))
        rows.append(row)
    for res in report["weights"]:
        row = [res["name"]] + [_fmt(res["dice"][r]["mean"]) for r in READOUTS]
        for r in READOUTS:
            v = res.get("vs_random", {}).get(r)
            row.append(f"{v['difference']:+.3f} [{v['ci_low']:+.3f}, {v['ci_high']:+.3f}]" if v else "-")
        row += [_fmt(res["diagnostics"].get(key)) for key, _ in DIAGNOSTIC_COLUMNS]
        row.append(_fmt(res["seconds"], 1))
        rows.append(row)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def write_markdown(report: dict[str, Any], path: Path) -> None:
    t = report["target"]
    classes = t["classes"][1:]
    lines = [f"# Probe: {t['dataset']} ({t['configuration']})", "",
             (f"Fit cases ({len(t['fit_cases'])}): {', '.join(t['fit_cases'])}. "
             f"Test cases ({len(t['test_cases'])}, "
             f"{t['split']}): {', '.join(t['test_cases'])}. Preprocessed with {t['plans']}."), "",
             ("Dense linear probe (logistic regression on class-balanced pixels of the frozen 2D encoder's "
             "upsampled, concatenated skips) and kNN label transfer (cosine, k = "
             f"{report['settings']['knn_k']}); {statistics_phrase(report['settings'])}; mean Dice over "
             "foreground classes and test cases. "
             "Intervals: bootstrap 95% over test cases and random seeds. Retrieval chance level: "
             f"{_fmt(report.get('retrieval_chance'))}."), "", format_table(report), "",
             "## Linear-probe Dice per class", "",
             "| weights | " + " | ".join(classes) + " |", "|" + "---|" * (len(classes) + 1)]
    base = report.get("random")
    if base:
        d = base["dice"]["logistic"]
        lines.append("| random | " + " | ".join(f"{m:.3f} ± {s:.3f}" for m, s in
                                                 zip(d["per_class_mean"], d["per_class_std"])) + " |")
    for res in report["weights"]:
        lines.append(f"| {res['name']} | "
                     + " | ".join(_fmt(v) for v in res["dice"]["logistic"]["per_class"]) + " |")
    lines += ["", (f"Total time {report['seconds']:.1f} s "
                   f"(loading and preprocessing {report['load_seconds']:.1f} s)."), ""]
    path.write_text("\n".join(lines))


def plot_dice(report: dict[str, Any], path: Path) -> None:
    """Per-class linear-probe Dice bars per weights file, the random mean ± std shaded per class."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    classes = report["target"]["classes"][1:]
    files = report["weights"]
    width = 0.8 / max(1, len(files))
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(classes) + 2), 3.6))
    base = report.get("random")
    for c in range(len(classes)):
        if base:
            m = base["dice"]["logistic"]["per_class_mean"][c]
            s = base["dice"]["logistic"]["per_class_std"][c]
            ax.fill_between([c - 0.45, c + 0.45], m - s, m + s, color="grey", alpha=0.3,
                            label="random mean ± std" if c == 0 else None)
            ax.plot([c - 0.45, c + 0.45], [m, m], color="grey", lw=1)
    for i, res in enumerate(files):
        xs = np.arange(len(classes)) - 0.4 + width * (i + 0.5)
        ax.bar(xs, np.nan_to_num(res["dice"]["logistic"]["per_class"]), width, label=res["name"])
    ax.set_xticks(range(len(classes)), classes)
    ax.set_ylabel("linear-probe Dice")
    ax.set_ylim(0, 1)
    ax.set_title(f"{report['target']['dataset']}: frozen-encoder probe")
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@contextmanager
def preserved_random_state() -> Iterator[None]:
    """Leave torch's (CPU and CUDA), NumPy's global and Python's random streams as they were: the probe
    builds networks and draws pixels, and must not shift a caller's (e.g. a training's) random stream."""
    import random

    import torch

    numpy_state, python_state = np.random.get_state(), random.getstate()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        np.random.set_state(numpy_state)
        random.setstate(python_state)


def run_probe(weights: Sequence[str], target: str | int, configuration: str = "3d_fullres",
              fit_cases: int | None = None, fit: Sequence[str] | None = None, random_seeds: int = 5,
              out: str | Path | None = None, seed: int = 0, settings: Any = None,
              stream: TextIO | None = None, statistics: str = "network",
              volume_context: bool = False, volume_context_dims: int = 0) -> dict[str, Any]:
    """Probe each of ``weights`` (paths or ``random``) on ``target``; returns the report dict. Progress
    and the table go to ``stream`` (default: standard output). ``statistics``: ``network``, the encoder's
    InstanceNorms pool statistics as the target's network does (over the patch depth in a 3d_fullres
    network planned with ``norm_over_volume``); ``slice``, every slice its own (the read-out before
    2026-12-06). ``volume_context``: append f_inter's per-slice output (over the 3d_fullres patch depth) to
    the dense features (docs/probe.md); ``volume_context_dims`` D > 0: only its first D principal components
    over the fit cases' slices."""
    from nnssl_joint.probe.readout import ReadoutSettings

    if statistics not in STATISTICS:
        raise NnsslJointError(f"--statistics must be one of {STATISTICS}, got {statistics!r}")
    with preserved_random_state():
        return _run_probe(weights, target, configuration, fit_cases, fit, random_seeds, out, seed,
                          settings or ReadoutSettings(seed=seed), stream, statistics, volume_context,
                          volume_context_dims)


def _run_probe(weights: Sequence[str], target: str | int, configuration: str, fit_cases: int | None,
               fit: Sequence[str] | None, random_seeds: int, out: str | Path | None, seed: int, settings: Any,
               stream: TextIO | None, statistics: str, volume_context: bool = False,
               volume_context_dims: int = 0) -> dict[str, Any]:
    from nnssl_joint.probe.data import load_target
    from nnssl_joint.probe.diagnostics import window_settings
    from nnssl_joint.probe.weights import (
        RANDOM,
        check_compatible,
        distinct_names,
        load_weights_file,
        random_weights,
    )

    if random_seeds < 0:
        raise NnsslJointError(f"--random-seeds must be >= 0, got {random_seeds}")
    if volume_context_dims < 0 or (volume_context_dims and not volume_context):
        raise NnsslJointError(f"--volume-context-dims {volume_context_dims}: give a positive number of "
                              "principal components together with --volume-context")
    if volume_context and configuration != "3d_fullres":
        raise NnsslJointError(f"--volume-context reads f_inter as the 3d_fullres network does; "
                              f"-c {configuration} has no slice Transformer: use -c 3d_fullres")
    files = [w for w in weights if str(w) != RANDOM]
    if len(files) < len(weights):
        random_seeds = max(1, random_seeds)
    if not files and random_seeds == 0:
        raise NnsslJointError("nothing to probe: give --weights files or --random-seeds >= 1")
    start = time.perf_counter()
    loaded = [load_weights_file(path, name) for name, path in distinct_names([str(f) for f in files])]
    tgt = load_target(target, configuration, fit_cases, fit, seed)
    settings = dataclasses.replace(settings, norm_slices=tgt.norm_slices if statistics == "network" else 1,
                                   volume_context=tgt.patch_slices if volume_context else 0,
                                   volume_context_dims=volume_context_dims)
    for w in loaded:
        check_compatible(w, tgt.preset, tgt.input_channels, tgt.dataset_name, tgt.plans_file)
        volume_context_parts(w, settings)  # fail before any probe runs
    load_seconds = time.perf_counter() - start
    n_slices, view_size = window_settings(loaded, tgt.preset.encoder.total_stride)

    def say(text: str) -> None:
        print(text, file=sys.stdout if stream is None else stream, flush=True)

    say(f"probe: {tgt.dataset_name} ({configuration}), fit {len(tgt.fit)} case(s), "
        f"test {len(tgt.test)} case(s) [{tgt.split}], windows N={n_slices} view={view_size}, "
        f"encoder statistics over {settings.norm_slices} slice(s)"
        + (f", f_inter context over {settings.volume_context} slices" if settings.volume_context else "")
        + (f" ({settings.volume_context_dims} principal components)" if settings.volume_context_dims else ""))
    randoms = []
    for i in range(random_seeds):
        res = probe_one(random_weights(tgt.network_builder, seed + i), tgt, n_slices, view_size, settings)
        say(f"  random seed {seed + i}: linear Dice {res['dice']['logistic']['mean']:.3f} "
            f"({res['seconds']:.1f} s)")
        randoms.append(res)
    results = []
    for w in loaded:
        res = probe_one(w, tgt, n_slices, view_size, settings)
        say(f"  {w.name}: linear Dice {res['dice']['logistic']['mean']:.3f} ({res['seconds']:.1f} s)")
        results.append(res)
    report: dict[str, Any] = {"target": tgt.record(), "settings": settings.to_dict(),
                              "windows": {"n_slices": n_slices, "view_size": view_size},
                              "random_runs": randoms, "weights": results}
    if randoms:
        report["random"] = compare_to_random(results, randoms, seed)
    chance = [r["diagnostics"].get("retrieval_chance") for r in randoms + results]
    report["retrieval_chance"] = next((c for c in chance if c is not None), None)
    report["load_seconds"] = round(load_seconds, 2)
    report["seconds"] = round(time.perf_counter() - start, 2)
    say(format_table(report))
    say(f"total {report['seconds']:.1f} s")
    if out is not None:
        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "probe.json").write_text(json.dumps(report, indent=1, allow_nan=True) + "\n")
        write_markdown(report, folder / "probe.md")
        plot_dice(report, folder / "probe.png")
        say(f"wrote {folder / 'probe.json'}, probe.md, probe.png")
    return report


def probe_pretraining_runs(runs: dict[str, Path], target: str | int, configuration: str, log_file: Path,
                           out: Path | None = None, seed: int = 0, random_seeds: int = 5) -> dict[str, Any]:
    """The probe of each pretraining run folder (``{label: folder}``) next to the random baseline, for the
    demo's and the benchmark's reports; progress and table go to ``log_file``."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "a") as log:
        return run_probe([f"{label}={folder}" for label, folder in runs.items()], target, configuration,
                         random_seeds=random_seeds, out=out, seed=seed, stream=log)


def report_section(report: dict[str, Any], heading: str = "##") -> list[str]:
    """Markdown lines for a report: the probe table (random baseline first) and how to read it."""
    t = report["target"]
    return [f"{heading} Frozen-encoder probe (`nnssl_joint probe`)", "",
            (f"Dense linear probe (logistic regression) and kNN read-out of each pretraining run's frozen "
             f"2D encoder on {t['dataset']} ({t['configuration']}; fit {len(t['fit_cases'])} case(s), "
             f"test {len(t['test_cases'])} case(s), {t['split']}; {statistics_phrase(report['settings'])}), "
             f"against {len(report.get('random_runs', []))} random nnU-Net initialisations; "
             "intervals: bootstrap 95% over test cases and random seeds. Label-free diagnostics as in "
             f"docs/probe.md (retrieval chance {_fmt(report.get('retrieval_chance'))})."), "",
            format_table(report), "", "![probe](probe.png)", ""]


def _cmd_probe(args: argparse.Namespace) -> int:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    run_probe(args.weights, args.target, args.c, args.fit_cases, args.fit, args.random_seeds, args.out,
              args.seed, statistics=args.statistics, volume_context=args.volume_context,
              volume_context_dims=args.volume_context_dims)
    return 0


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "probe",
        help="frozen-encoder dense linear probe + label-free diagnostics against random initialisations",
        description="Measure what pretrained weights know: the frozen 2D encoder runs on every slice of a "
        "labeled target's fit and test cases (preprocessed with the target's plugin plans), a logistic "
        "regression and a kNN read-out on its dense features give per-class Dice; RankMe, retrieval, "
        "slice-position R^2, prototype entropy and Z cosine describe the features without labels. "
        "Compared with nnU-Net's random "
        "initialisation over several seeds. See docs/probe.md.",
    )
    p.add_argument("--weights", nargs="+", required=True, metavar="W",
                   help="JointSSLPretrainTrainer run folder, checkpoint_final.pth, pretrained_for_2d.pth / "
                   "pretrained_for_3d_fullres.pth, or 'random'; NAME=PATH sets the label in the table")
    p.add_argument("--target", required=True, help="labeled raw dataset id or name, planned with "
                   "nnssl_joint plan_and_preprocess -d ID --downstream")
    p.add_argument("-c", default="3d_fullres", choices=("2d", "3d_fullres"),
                   help="configuration whose preprocessing the probe uses (default 3d_fullres)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--fit-cases", type=int, default=None, metavar="N",
                       help="fit on N labeled cases (a seeded choice; default: all non-test labeled cases)")
    group.add_argument("--fit", nargs="+", default=None, metavar="CASE", help="fit on these labeled cases")
    p.add_argument("--random-seeds", type=int, default=5,
                   help="random initialisations of the baseline (default 5)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the case split, pixel sampling and random inits")
    p.add_argument("--out", default=None, help="folder for probe.json, probe.md and probe.png")
    p.add_argument("--statistics", choices=STATISTICS, default="network",
                   help="the encoder's InstanceNorm statistics: 'network' (default), as the target's network "
                   "takes them (over the patch depth for 3d_fullres plans with norm_over_volume); 'slice', "
                   "each slice its own (the probe before 2026-12-06)")
    p.add_argument("--volume-context", action="store_true",
                   help="append f_inter's per-slice output (slice Transformer over groups of the 3d_fullres "
                   "patch depth) to every pixel's dense features, as the 3D network's slice_context reads it;"
                   " random initialisations use their own f_inter (docs/probe.md)")
    p.add_argument("--volume-context-dims", type=int, default=0, metavar="D",
                   help="with --volume-context: append only the first D principal components of f_inter's "
                   "output, fitted on the fit cases' slices (default 0: all of its values)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    p.set_defaults(func=_cmd_probe)
