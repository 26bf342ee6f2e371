"""The demo's report: Dice tables, figures and a markdown page from the data
:mod:`nnssl_joint.experiments.demo` collects (plain dicts and arrays, so the report can be rebuilt or
tested without running anything).

Files written to the report folder: ``report.md``, ``report.json``, ``dice.png`` (Dice per class and
arm), ``pretraining_curves.png`` (every loss term and the prototype-usage entropy per epoch, both
pretraining runs), ``finetuning_curves.png``, ``montage.png`` (test slices: image, reference and the
prediction of each arm) and ``embeddings.png`` (PCA of the volume features Z, coloured by source).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

#: Dice points (0-100) by which joint pretraining should beat scratch (issue: the demo's target)
TARGET_GAIN_POINTS = 5.0

#: Dice points (0-100) within which the plugin's network from scratch should stay of stock nnU-Net (issue 16)
STOCK_TOLERANCE_POINTS = 1.0
#: (arm, baseline) differences the demo report states, in Dice points: every pretrained arm against both
#: baselines (the plugin's network from scratch and stock nnU-Net), joint against 2D-only, and the plugin's
#: network from scratch against stock nnU-Net
GAIN_PAIRS = (("joint", "scratch"), ("joint", "intra"), ("intra", "scratch"), ("joint", "nnunet"),
              ("intra", "nnunet"), ("scratch", "nnunet"))
#: how the report names the arms of GAIN_PAIRS in text
_SHORT_NAMES = {"scratch": "scratch", "intra": "2D-only", "joint": "joint", "nnunet": "stock nnU-Net"}

_ARM_COLOURS = {"scratch": "#7f7f7f", "intra": "#1f77b4", "joint": "#d62728", "nnunet": "#2ca02c"}
_LABEL_COLOURS = np.array([[0, 0, 0], [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200],
                           [245, 130, 48], [145, 30, 180]], dtype=np.float32) / 255.0
_CURVE_KEYS = (("train_losses", "total loss"), ("loss_intra", "L_intra"), ("loss_intra_3d", "L_intra_3d"),
               ("loss_inter", "L_inter"), ("loss_mask", "L_mask"),
               ("entropy_2d", "prototype usage entropy 2D"), ("entropy_3d", "prototype usage entropy 3D"))


# ----------------------------------------------------------------------------------------------------
# numbers


def pca_2d(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Project rows of ``features`` (n, d) onto their first two principal components (numpy SVD).

    Returns (coords (n, 2), explained variance ratio (2,)); missing components (n < 3 or d < 2) are 0."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"features must be a non-empty (n, d) array, got shape {x.shape}")
    x = x - x.mean(0, keepdims=True)
    _, s, vt = np.linalg.svd(x, full_matrices=False)
    k = min(2, len(s))
    coords = np.zeros((len(x), 2))
    coords[:, :k] = x @ vt[:k].T
    variance = s ** 2
    explained = np.zeros(2)
    if variance.sum() > 0:
        explained[:k] = variance[:k] / variance.sum()
    return coords, explained


def summarize_dice(dice: dict[str, dict[str, dict[str, float]]], classes: dict[str, str]) -> dict[str, Any]:
    """Per arm: mean and std over test cases per class, and the mean over classes and cases (NaNs skipped).

    ``dice[arm][case][class_id]`` in [0, 1]; ``classes`` maps class id (str) to name."""
    per_class: dict[str, dict[str, dict[str, float]]] = {}
    means: dict[str, float] = {}
    for arm, cases in dice.items():
        per_class[arm] = {}
        for c in classes:
            values = np.array([cases[case].get(c, math.nan) for case in cases], dtype=float)
            finite = values[np.isfinite(values)]
            per_class[arm][c] = {"mean": float(finite.mean()) if len(finite) else math.nan,
                                 "std": float(finite.std()) if len(finite) else math.nan,
                                 "n": len(finite)}
        case_means = [np.nanmean([cases[case].get(c, math.nan) for c in classes]) for case in cases]
        means[arm] = float(np.nanmean(case_means)) if case_means else math.nan
    gain = {}
    for a, b in GAIN_PAIRS:
        if a in means and b in means and np.isfinite(means[a]) and np.isfinite(means[b]):
            gain[f"{a}_vs_{b}"] = 100.0 * (means[a] - means[b])
    verdict = {}
    if "joint_vs_scratch" in gain:
        verdict["joint_beats_scratch_by_target"] = bool(gain["joint_vs_scratch"] >= TARGET_GAIN_POINTS)
    if "joint_vs_intra" in gain:
        verdict["joint_beats_intra"] = bool(gain["joint_vs_intra"] > 0)
    if "scratch_vs_nnunet" in gain:
        verdict["scratch_within_tolerance_of_nnunet"] = bool(gain["scratch_vs_nnunet"]
                                                             >= -STOCK_TOLERANCE_POINTS)
    return {"per_class": per_class, "mean_dice": means, "gain_points": gain,
            "target_gain_points": TARGET_GAIN_POINTS, "stock_tolerance_points": STOCK_TOLERANCE_POINTS,
            "verdict": verdict}


def gain_phrases(gain: dict[str, float], bold: tuple[str, ...] = ()) -> list[str]:
    """``"joint - scratch +1.2"`` for every difference in ``gain`` (keys ``<arm>_vs_<baseline>``), in the
    order of :data:`GAIN_PAIRS`; a pair whose arms did not both run is left out, never printed as nan.
    Keys in ``bold`` get their number in markdown bold."""
    phrases = []
    for a, b in GAIN_PAIRS:
        key = f"{a}_vs_{b}"
        if key in gain and np.isfinite(gain[key]):
            number = f"{gain[key]:+.1f}"
            phrases.append(f"{_SHORT_NAMES[a]} - {_SHORT_NAMES[b]} "
                           + (f"**{number}**" if key in bold else number))
    return phrases


#: a 2D projection whose slices have a mean pairwise cosine above this has collapsed to (nearly) one point
COLLAPSE_COSINE = 0.99
#: L_intra within this fraction of log K means uniform predictions over the prototypes
COLLAPSE_LOSS_TOLERANCE = 0.01


def collapse_verdicts(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per pretraining run: whether L_intra sits at log K (uniform predictions) and whether the 2D projections
    of different slices coincide; either means the 2D representation collapsed."""
    verdicts = {}
    for run, panel in (data.get("embeddings") or {}).items():
        check = panel.get("collapse_check")
        if not check:
            continue
        final = _last_finite(data["pretraining"].get(run, {}).get("logging", {}).get("loss_intra"))
        at_log_k = (final is not None
                    and abs(final - check["log_k_2d"]) <= COLLAPSE_LOSS_TOLERANCE * check["log_k_2d"])
        same_point = check["z_mean_pairwise_cosine"] > COLLAPSE_COSINE
        volume_cos = check.get("volume_z_mean_pairwise_cosine")
        volume_trained = run != "intra"  # f_inter gets no training signal in 2D-only pretraining
        verdicts[run] = {"final_loss_intra": final, "log_k_2d": check["log_k_2d"],
                         "z_mean_pairwise_cosine": check["z_mean_pairwise_cosine"],
                         "volume_z_mean_pairwise_cosine": volume_cos,
                         "loss_at_log_k": bool(at_log_k), "projections_coincide": bool(same_point),
                         "collapsed": bool(at_log_k or same_point),
                         "volume_features_collapsed": bool(volume_trained and volume_cos is not None
                                                           and volume_cos > COLLAPSE_COSINE)}
    return verdicts


def _last_finite(values: list[float] | None) -> float | None:
    for v in reversed(values or []):
        if v is not None and np.isfinite(v):
            return float(v)
    return None


# ----------------------------------------------------------------------------------------------------
# figures


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt: Any, fig: Any, path: Path, dpi: int) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def plot_dice(dice: dict[str, dict[str, dict[str, float]]], classes: dict[str, str],
              arm_labels: dict[str, str], path: Path) -> Path:
    """Grouped bars: one group per class (+ the mean over classes), one bar per arm with the spread over test
    cases as error bar and each case as a dot."""
    plt = _plt()
    groups = list(classes) + ["mean"]
    names = [classes[c] for c in classes] + ["mean over classes"]
    arms = list(dice)
    width = 0.8 / max(1, len(arms))
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(groups), 4.2))
    for i, arm in enumerate(arms):
        cases = dice[arm]
        per_group = []
        for g in groups:
            if g == "mean":
                per_group.append([np.nanmean([cases[k].get(c, np.nan) for c in classes]) for k in cases])
            else:
                per_group.append([cases[k].get(g, np.nan) for k in cases])
        x = np.arange(len(groups)) + (i - (len(arms) - 1) / 2) * width
        means = [np.nanmean(v) if np.isfinite(v).any() else 0.0 for v in per_group]
        stds = [np.nanstd(v) if np.isfinite(v).any() else 0.0 for v in per_group]
        ax.bar(x, means, width, yerr=stds, capsize=3, color=_ARM_COLOURS.get(arm), alpha=0.85,
               label=arm_labels.get(arm, arm))
        for xi, values in zip(x, per_group):
            ax.scatter(np.full(len(values), xi), values, s=9, color="black", zorder=3)
    ax.set_xticks(np.arange(len(groups)))
    ax.set_xticklabels(names)
    ax.set_ylim(0, 1)
    ax.set_ylabel("Dice on held-back test cases")
    ax.legend(loc="upper right", fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _save(plt, fig, path, dpi=120)


def plot_pretraining_curves(runs: dict[str, dict[str, Any]], path: Path) -> Path:
    """Every loss term and the prototype-usage entropies per epoch, one line per pretraining run."""
    plt = _plt()
    keys = [(k, t) for k, t in _CURVE_KEYS
            if any(np.isfinite(np.asarray(r["logging"].get(k, []), dtype=float)).any()
                   for r in runs.values())]
    cols = 4
    rows = max(1, math.ceil(len(keys) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 2.7 * rows), squeeze=False)
    colours = {"joint": _ARM_COLOURS["joint"], "intra": _ARM_COLOURS["intra"]}
    for ax, (key, title) in zip(axes.flat, keys):
        for run, info in runs.items():
            values = np.asarray(info["logging"].get(key, []), dtype=float)
            if np.isfinite(values).any():
                ax.plot(np.arange(len(values)), values, marker="o", ms=3, color=colours.get(run),
                        label=info["label"])
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(runs), fontsize=8)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_finetuning_curves(finetuning: dict[str, dict[str, Any]], arm_labels: dict[str, str],
                           path: Path) -> Path:
    """Training loss, validation loss and nnU-Net's pseudo Dice (validation case) per epoch and arm."""
    plt = _plt()
    keys = (("train_losses", "training loss"), ("val_losses", "validation loss"),
            ("mean_fg_dice", "pseudo Dice (validation case)"))
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2))
    for ax, (key, title) in zip(axes, keys):
        for arm, info in finetuning.items():
            values = np.asarray(info.get("logging", {}).get(key, []), dtype=float)
            if len(values):
                ax.plot(np.arange(len(values)), values, marker="o", ms=3, color=_ARM_COLOURS.get(arm),
                        label=arm_labels.get(arm, arm))
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    return _save(plt, fig, path, dpi=110)


def _overlay(image: np.ndarray, labels: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    lo, hi = np.percentile(image, [0.5, 99.5])
    grey = np.clip((image - lo) / (hi - lo if hi > lo else 1.0), 0, 1)
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    labels = np.asarray(labels).astype(int)
    colours = _LABEL_COLOURS[np.clip(labels, 0, len(_LABEL_COLOURS) - 1)]
    mask = (labels > 0)[..., None]
    return np.where(mask, (1 - alpha) * rgb + alpha * colours, rgb)


def plot_montage(cases: list[dict[str, Any]], arm_labels: dict[str, str], path: Path) -> Path:
    """Rows: test cases (the slice with the most foreground); columns: image, reference, each arm."""
    plt = _plt()
    arms = list(arm_labels)
    cols = 2 + len(arms)
    rows = max(1, len(cases))
    fig, axes = plt.subplots(rows, cols, figsize=(2.3 * cols, 2.4 * rows), squeeze=False)
    for r, case in enumerate(cases):
        image = np.asarray(case["image"], dtype=np.float32)
        panels = [("image", _overlay(image, np.zeros_like(image, dtype=int), 0.0)),
                  ("reference", _overlay(image, case["reference"]))]
        panels += [(f"{arm_labels[a]}\nDice {case['dice'][a]:.2f}", _overlay(image, case["predictions"][a]))
                   for a in arms]
        for c, (title, rgb) in enumerate(panels):
            ax = axes[r, c]
            ax.imshow(rgb, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(title if c >= 2
                         else f"{case['case']} z={case['slice']}\n{title}" if c == 0 else title,
                         fontsize=7)
    return _save(plt, fig, path, dpi=110)


def plot_embeddings(panels: dict[str, dict[str, Any]], path: Path) -> Path:
    """One scatter per pretrained model: PCA of the volume features Z, coloured by source dataset."""
    plt = _plt()
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(5.2 * max(1, len(panels)), 4.4), squeeze=False)
    palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b"]
    for ax, (run, panel) in zip(axes.flat, panels.items()):
        coords = np.asarray(panel["coords"], dtype=float)
        groups = panel["groups"]
        for i, group in enumerate(dict.fromkeys(groups)):
            idx = [j for j, g in enumerate(groups) if g == group]
            ax.scatter(coords[idx, 0], coords[idx, 1], s=22, alpha=0.8, color=palette[i % len(palette)],
                       label=group)
        ev = panel.get("explained_variance", [0, 0])
        ax.set_xlabel(f"PC 1 ({100 * ev[0]:.0f}% of variance)")
        ax.set_ylabel(f"PC 2 ({100 * ev[1]:.0f}% of variance)")
        ax.set_title(f"volume features Z, {panel['label']}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(plt, fig, path, dpi=110)


# ----------------------------------------------------------------------------------------------------
# markdown and json


def _fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None or not np.isfinite(value) else f"{value:.{digits}f}"


def _seconds(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


#: settings a demo or benchmark records only when they differ from the defaults, as the reports name them
_SETTING_LABELS = (("preset", "Preset"), ("recipe", "Fine-tuning recipe"),
                   ("pretrain_objective", "Pretraining objective overrides"),
                   ("pretrain_options", "Pretraining data/optim options"),
                   ("finetune", "Fine-tuning overrides (plugin networks)"))


def _recorded_settings(settings: dict[str, Any], arms: Iterable[str], skip: tuple[str, ...] = ()) -> str:
    """One sentence per :data:`_SETTING_LABELS` key the record holds (each led by a space), ``skip`` aside;
    what the 2D-only arm set aside of the objective overrides only where that arm is among ``arms``."""
    from nnssl_joint.experiments.budgets import set_aside_sentence

    sentences = []
    for key, label in _SETTING_LABELS:
        if key in settings and key not in skip:
            sentences.append(f" {label} {json.dumps(settings[key])}.")
            aside = set_aside_sentence(settings[key], arms) if key == "pretrain_objective" else ""
            if aside:
                sentences.append(f" {aside}")
    return "".join(sentences)


def render_markdown(data: dict[str, Any], summary: dict[str, Any]) -> str:
    arms = data["arms"]
    classes = data["classes"]
    settings = data["settings"]
    budget = settings["budget"]
    lines = ["# nnssl_joint demo report", ""]
    lines += [f"Budget **{budget['name']}**, **{settings['labeled']}** labeled training case(s) "
              f"({', '.join(data['split']['train'])}; validation case {', '.join(data['split']['val'])}), "
              f"seed {settings['seed']}, {len(data['test_cases'])} held-back test cases "
              f"({', '.join(data['test_cases'])}) that never enter training or model selection. "
              f"Pretraining pool: {budget['n_3d']} synthetic volumes + {budget['n_2d']} synthetic 2D images"
              + (" + the real image pool" if settings.get("real") else "") + "."
              # records before the preset existed, and every record with the default, carry no key: cpu
              + f" Preset `{settings.get('preset', 'cpu')}`."
              + _recorded_settings(settings, arms, skip=("preset",)), ""]
    lines += ["## Dice on the test cases", ""]
    header = "| arm | " + " | ".join(classes.values()) + " | mean |"
    lines += [header, "|" + " --- |" * (len(classes) + 2)]
    for arm, label in arms.items():
        cells = [f"{_fmt(summary['per_class'][arm][c]['mean'])} ± "
                 f"{_fmt(summary['per_class'][arm][c]['std'], 2)}"
                 for c in classes]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | **{_fmt(summary['mean_dice'][arm])}** |")
    lines.append("")
    gain = summary["gain_points"]
    verdict = summary["verdict"]
    phrases = gain_phrases(gain, bold=("joint_vs_scratch", "joint_vs_intra", "joint_vs_nnunet",
                                       "intra_vs_nnunet"))
    if phrases:
        lines += [("Mean over classes and cases; ± is the spread (std) over test cases. Differences in Dice "
                   "points: " + ", ".join(phrases) + "."), ""]
    if "nnunet" in arms:
        lines += [("Stock nnU-Net is nnU-Net's own planner, plans (`nnUNetPlans`), network and trainer, "
                   "trained from scratch with the same budget (`nnUNetTrainerBudget`): a pretrained arm "
                   "helps a user only if it beats this as well as the plugin's network from scratch."), ""]
    targets = []
    if "joint_beats_scratch_by_target" in verdict and "joint_beats_intra" in verdict:
        met = verdict["joint_beats_scratch_by_target"] and verdict["joint_beats_intra"]
        targets.append(f"joint beats scratch by at least {summary['target_gain_points']:.0f} points and "
                       f"beats 2D-only: {'**met**' if met else '**not met** in this run'}")
    if "scratch_within_tolerance_of_nnunet" in verdict:
        within = verdict["scratch_within_tolerance_of_nnunet"]
        targets.append(f"the plugin's network from scratch within {summary['stock_tolerance_points']:.0f} "
                       f"point of stock nnU-Net: {'**met**' if within else '**not met** in this run'}")
    if targets:
        lines += ["Targets: " + "; ".join(targets) + "."
                  + f" With {len(data['test_cases'])} test cases and one training run per arm the "
                  "differences carry run-to-run noise of several points; the diagnostics below say whether "
                  "the pretrained weights were loaded and whether the prototypes collapsed.", ""]
    collapse = summary.get("collapse", {})
    collapsed = [data["pretraining"][r]["label"] for r, v in collapse.items() if v["collapsed"]]
    volume_collapsed = [data["pretraining"][r]["label"] for r, v in collapse.items()
                        if v["volume_features_collapsed"]]
    if volume_collapsed:
        lines += [(f"**Volume-feature collapse:** the volume features Z of {' and '.join(volume_collapsed)} "
                   "are nearly identical for every window of every volume (mean pairwise cosine > "
                   f"{COLLAPSE_COSINE}); L_inter was satisfied by a constant volume feature, so the 3D "
                   "clustering task taught f_inter nothing volume-specific (its per-slice outputs, which "
                   "the 3D fine-tuning network uses, may still vary)."), ""]
    if collapsed:
        lines += [(f"**Collapse:** the 2D representation of {' and '.join(collapsed)} collapsed (L_intra at "
                  "log K, i.e. uniform predictions over the prototypes, and/or every slice projected onto "
                  "nearly the same point; see the collapse check below). Differences between pretrained and "
                  "scratch arms then do not come from learned features."), ""]
    lines += ["![Dice per class and arm](dice.png)", "", "![test slices](montage.png)", ""]

    lines += ["## Pretraining", ""]
    lines += [(f"{budget['pretrain_epochs']} epochs x {budget['pretrain_iterations']} iterations "
               "for each run."), ""]
    lines += [("| run | final total loss | L_intra | L_intra_3d | L_inter | L_mask "
               "| entropy 2D | entropy 3D |"),
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for info in data["pretraining"].values():
        log = info["logging"]
        cells = [_fmt(_last_finite(log.get(k)))
                 for k in ("train_losses", "loss_intra", "loss_intra_3d", "loss_inter", "loss_mask",
                           "entropy_2d", "entropy_3d")]
        lines.append(f"| {info['label']} | " + " | ".join(cells) + " |")
    lines += ["", ("Prototype-usage entropy (of argmax assignments) is normalised to [0, 1]: near 0 means "
                   "a few prototypes take every sample. It can look healthy while the representation has "
                   "collapsed (tied scores give arbitrary argmaxes), hence the direct check below."), ""]
    if collapse:
        lines += [("Collapse check on real slices and volume windows of the pretraining pool and the "
                  "labeled task (cosine 1 = every input maps to the same point):"), "",
                  ("| run | final L_intra | log K (uniform prediction) | "
                   "mean pairwise cosine of 2D projections z | "
                   "2D collapsed | mean pairwise cosine of volume features Z |"),
                  "| --- | --- | --- | --- | --- | --- |"]
        for run, v in collapse.items():
            volume = _fmt(v.get("volume_z_mean_pairwise_cosine"), 6)
            if run == "intra":
                volume += " (f_inter untrained)"
            elif v.get("volume_features_collapsed"):
                volume += " **collapsed**"
            lines.append(f"| {data['pretraining'][run]['label']} | {_fmt(v['final_loss_intra'], 4)} | "
                         f"{_fmt(v['log_k_2d'], 4)} | {_fmt(v['z_mean_pairwise_cosine'], 5)} | "
                         f"{'**yes**' if v['collapsed'] else 'no'} | {volume} |")
        lines.append("")
    lines += ["![pretraining curves](pretraining_curves.png)", ""]

    lines += ["## Fine-tuning", ""]
    ft = budget
    lines += [(f"Same budget for every arm: {ft['finetune_epochs']} epochs x {ft['finetune_iterations']} "
              "iterations (nnU-Net 3d_fullres with the plugin's plans, JointSSLFinetuneTrainer, "
              + ("initial lr 0.01 and nnU-Net's poly schedule for every arm, no warm-up"
                 if not ft["finetune_warmup_epochs"] else
                 f"initial lr 0.01, {ft['finetune_warmup_epochs']} warm-up epoch(s) for the runs from "
                 "pretrained weights, none from scratch")
              + ("; stock nnU-Net: nnUNetPlans, nnUNetTrainerBudget, nnU-Net's own schedule without warm-up"
                 if "nnunet" in arms else "")
              + f"); prediction with nnU-Net's checkpoint_final "
              f"{'with' if ft['test_time_augmentation'] else 'without'} test-time mirroring."), ""]
    lines += ["| arm | weights check | pretrained parts moved by fine-tuning | nnU-Net validation Dice |",
              "| --- | --- | --- | --- |"]
    for arm, info in data["finetuning"].items():
        check = info.get("weights_check") or ("n/a (random initialisation)" if arm in ("scratch", "nnunet")
                                              else "NOT FOUND in log")
        change = info.get("pretrained_change")
        lines.append(f"| {arms[arm]} | {check} | "
                     f"{'n/a' if change is None else f'{100 * change:.1f}% (relative L2)'} "
                     f"| {_fmt(info.get('validation_dice'))} |")
    lines += ["", "![fine-tuning curves](finetuning_curves.png)", ""]

    if data.get("embeddings"):
        lines += ["## Volume embeddings", ""]
        lines += [("Volume features Z = normalize(mean_n f_inter(g(f_intra(x_n)))) of windows of "
                  "preprocessed volumes, projected on their first two principal components per model; "
                  "colour = source dataset. Under 2D-only pretraining f_inter is untrained (random), so its "
                  "panel shows what the 2D encoder alone separates."), "",
                  "![embeddings](embeddings.png)", ""]

    if data.get("probe"):
        from nnssl_joint.probe.run import report_section

        lines += report_section(data["probe"])

    lines += ["## Run", ""]
    lines += ["| step | time |", "| --- | --- |"]
    for key, seconds in data["timings"].items():
        lines.append(f"| {key} | {_seconds(seconds)} |")
    total = sum(data["timings"].values())
    lines.append(f"| **total (before this report)** | **{_seconds(total)}** |")
    machine = data.get("machine", {})
    lines += ["", (f"Machine: {machine.get('cpus')} CPU(s), {machine.get('platform')}, "
              f"Python {machine.get('python')}; "
              f"load average at report time {machine.get('load_average')}."), ""]
    return "\n".join(lines) + "\n"


def _json_ready(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, np.ndarray):
        return _json_ready(value.tolist())
    if isinstance(value, (np.floating, float)):
        return None if not np.isfinite(value) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    return value


def write_report(data: dict[str, Any], folder: Path) -> dict[str, Path]:
    """Write every report file into ``folder``; returns their paths by name."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    summary = summarize_dice(data["dice"], data["classes"])
    summary["collapse"] = collapse_verdicts(data)
    files = {
        "dice": plot_dice(data["dice"], data["classes"], data["arms"], folder / "dice.png"),
        "pretraining_curves": plot_pretraining_curves(data["pretraining"], folder / "pretraining_curves.png"),
        "finetuning_curves": plot_finetuning_curves(data["finetuning"], data["arms"],
                                                    folder / "finetuning_curves.png"),
    }
    if data.get("montage"):
        files["montage"] = plot_montage(data["montage"], data["arms"], folder / "montage.png")
    if data.get("embeddings"):
        files["embeddings"] = plot_embeddings(data["embeddings"], folder / "embeddings.png")
    if data.get("probe"):
        from nnssl_joint.probe.run import plot_dice as plot_probe

        files["probe"] = folder / "probe.png"
        plot_probe(data["probe"], files["probe"])
    files["markdown"] = folder / "report.md"
    files["markdown"].write_text(render_markdown(data, summary))
    record = {k: v for k, v in data.items() if k != "montage"}
    record["montage_cases"] = [{"case": m["case"], "slice": m["slice"], "dice": m["dice"]}
                               for m in data.get("montage", [])]
    record["summary"] = summary
    files["json"] = folder / "report.json"
    files["json"].write_text(json.dumps(_json_ready(record), indent=2) + "\n")
    return files


# ----------------------------------------------------------------------------------------------------
# the benchmark's report (nnssl_joint.experiments.benchmark)


def plot_label_efficiency(summary: dict[str, dict[str, Any]], arm_labels: dict[str, str], path: Path) -> Path:
    """Dice against the number of labeled cases: one line per arm (mean over seeds, bars: ± one standard
    deviation), every seed's run as a dot."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    arms = list(summary)
    for i, arm in enumerate(arms):
        ks = sorted(int(k) for k in summary[arm])
        offset = (i - (len(arms) - 1) / 2) * 0.04  # arms side by side on the log axis
        xs = [k * (1 + offset) for k in ks]
        means = [summary[arm][str(k)]["dice"]["mean"] for k in ks]
        stds = [summary[arm][str(k)]["dice"]["std"] or 0.0 for k in ks]
        shown = [(x, m, s) for x, m, s in zip(xs, means, stds) if m is not None]
        if not shown:
            continue
        line = ax.errorbar([x for x, _, _ in shown], [m for _, m, _ in shown], yerr=[s for _, _, s in shown],
                           marker="o", capsize=3, label=arm_labels.get(arm, arm))
        for x, k in zip(xs, ks):
            seeds = [v for v in summary[arm][str(k)]["per_seed"].values() if v is not None]
            ax.scatter([x] * len(seeds), seeds, s=10, alpha=0.5, color=line.lines[0].get_color())
    ks_all = sorted({int(k) for arm in arms for k in summary[arm]})
    ax.set_xscale("log")
    ax.set_xticks(ks_all)
    ax.set_xticklabels([str(k) for k in ks_all])
    ax.minorticks_off()
    ax.set_xlabel("labeled training cases")
    ax.set_ylabel("Dice on the test cases (mean over classes)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(plt, fig, path, 110)


def plot_paired(data: dict[str, Any], path: Path) -> Path:
    """Per labeled count (rows) and baseline (``scratch``, ``nnunet``; columns): one line per seed from the
    baseline's Dice to each other arm's Dice, so paired differences are seen run by run."""
    plt = _plt()
    arms = list(data["summary"])
    baselines = [b for b in ("scratch", "nnunet") if b in arms] or arms[:1]
    ks = [str(k) for k in data["settings"]["labeled"]]
    fig, axes = plt.subplots(len(ks), len(baselines), figsize=(4.2 * len(baselines), 3.2 * len(ks)),
                             squeeze=False)
    for row, k in enumerate(ks):
        for col, baseline in enumerate(baselines):
            ax = axes[row][col]
            others = [a for a in arms if a != baseline]
            per_seed = data["summary"][baseline].get(k, {}).get("per_seed", {})
            for seed, base in per_seed.items():
                if base is None:
                    continue
                for i, arm in enumerate(others, 1):
                    value = data["summary"][arm].get(k, {}).get("per_seed", {}).get(seed)
                    if value is None:
                        continue
                    color = "tab:green" if value > base else "tab:red"
                    ax.plot([0, i], [base, value], color=color, alpha=0.6, marker="o", markersize=3)
            ax.set_xticks(range(len(others) + 1))
            ax.set_xticklabels([baseline, *others], rotation=20, fontsize=8)
            ax.set_ylabel("Dice (mean over classes)")
            ax.set_title(f"{k} labeled: vs {baseline}", fontsize=9)
            ax.grid(alpha=0.3)
    return _save(plt, fig, path, 110)


def plot_class_bars(data: dict[str, Any], path: Path) -> Path:
    """Per labeled count: Dice per class, one bar per arm (mean over seeds, error bar one standard
    deviation)."""
    plt = _plt()
    summary, classes = data["summary"], data["classes"]
    arms = list(summary)
    ks = [str(k) for k in data["settings"]["labeled"]]
    fig, axes = plt.subplots(1, len(ks),
                             figsize=(max(4.5, 1.2 * len(classes) * len(arms) / 2) * len(ks), 3.6),
                             squeeze=False)
    width = 0.8 / max(1, len(arms))
    for col, k in enumerate(ks):
        ax = axes[0][col]
        for i, arm in enumerate(arms):
            per_class = summary[arm].get(k, {}).get("per_class", {})
            means = [(per_class.get(c) or {}).get("mean") or 0.0 for c in classes]
            stds = [(per_class.get(c) or {}).get("std") or 0.0 for c in classes]
            xs = [j + (i - (len(arms) - 1) / 2) * width for j in range(len(classes))]
            ax.bar(xs, means, width, yerr=stds, capsize=2, label=data["arms"].get(arm, arm))
        ax.set_xticks(range(len(classes)))
        ax.set_xticklabels(list(classes.values()), rotation=20, fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_ylabel("Dice")
        ax.set_title(f"{k} labeled", fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    axes[0][0].legend(fontsize=7)
    return _save(plt, fig, path, 110)


def _mean_std(entry: dict[str, Any] | None) -> str:
    if not entry or entry.get("mean") is None:
        return "n/a"
    std = "" if entry.get("std") is None else f" ± {entry['std']:.3f}"
    return f"{entry['mean']:.3f}{std} (n={entry['n']})"


def _summary_tables(summary: dict[str, Any], arm_labels: dict[str, str], classes: dict[str, str],
                    ks: list[str], level: str = "##", cases: str = "test cases") -> list[str]:
    """Markdown of an :func:`nnssl_joint.experiments.benchmark.aggregate` summary: Dice per arm and labeled
    count, the paired gains over each baseline, Dice per class; ``level``: the headings' level, ``cases``:
    what the Dice is a mean over."""
    lines = [f"{level} Dice (mean over classes and {cases}; mean ± std over seeds)", "",
             "| arm | " + " | ".join(f"{k} labeled" for k in ks) + " |",
             "|---|" + "---|" * len(ks)]
    for arm, per_k in summary.items():
        lines.append(f"| {arm_labels.get(arm, arm)} | "
                     + " | ".join(_mean_std(per_k.get(k, {}).get("dice")) for k in ks)
                     + " |")
    for baseline in ("scratch", "nnunet"):
        compared = [a for a in summary if f"gain_vs_{baseline}_points" in next(iter(summary[a].values()), {})]
        if not compared:
            continue
        lines += ["", (f"{level} Gain over {arm_labels.get(baseline, baseline)} (Dice points, paired by "
                       "seed: mean ± std [bootstrap 95% interval over seeds]; wins = seeds where the arm "
                       f"beat {baseline})"), "",
                  "| arm | " + " | ".join(f"{k} labeled" for k in ks) + " |", "|---|" + "---|" * len(ks)]
        for arm in compared:
            cells = []
            for k in ks:
                entry = summary[arm].get(k, {})
                gain = entry.get(f"gain_vs_{baseline}_points") or {}
                if gain.get("mean") is None:
                    cells.append("n/a")
                    continue
                std = "" if gain.get("std") is None else f" ± {gain['std']:.1f}"
                ci = "" if not gain.get("ci95") else " [{:+.1f}, {:+.1f}]".format(
                    *(round(x, 1) + 0.0 for x in gain["ci95"]))  # + 0.0: no "-0.0" for a rounding residue
                cells.append(f"{gain['mean']:+.1f}{std}{ci} pts, wins {entry[f'wins_vs_{baseline}']}")
            lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    lines += ["", f"{level} Per class (mean ± std over seeds)", ""]
    for arm, per_k in summary.items():
        for k in ks:
            per_class = per_k.get(k, {}).get("per_class", {})
            parts = ", ".join(f"{classes.get(c, c)} {_mean_std(v)}" for c, v in per_class.items())
            lines.append(f"- {arm}, {k} labeled: {parts}")
    return lines


def _heldout_section(held: dict[str, Any], data: dict[str, Any], ks: list[str]) -> list[str]:
    """The read-out of one ``--heldout`` dataset: the test set's tables on its cases, and each run's mean
    Dice next to the run's test-set mean Dice."""
    lines = ["", (f"## Held-out read-out: {held['dataset']} ({held['cases']} cases; nothing trains or tunes "
                  "on them)"), "",
             (f"Cases: {held.get('test_source')} of `{held.get('source')}`, predicted by the final "
              f"checkpoint of every run as the test cases are; finished {held['finished_runs']} of "
              f"{held['planned_runs']} runs. Their labels are read only by the evaluation after "
              "prediction."), ""]
    lines += _summary_tables(held["summary"], data["arms"], data["classes"], ks, "###", "held-out cases")
    lines += ["", "### Runs", "", "| arm | labeled | seed | mean Dice (held-out) | mean Dice (test) |",
              "|---|---|---|---|---|"]
    for key, run in held["runs"].items():
        test = (data["runs"].get(key) or {}).get("mean_dice")
        lines.append(f"| {run['arm']} | {run['labeled']} | {run['seed']} | {_fmt(run['mean_dice'])} | "
                     f"{_fmt(test)} |")
    return lines


def _schedule_sentence(budget: dict[str, Any], recipe: str) -> str:
    """The fine-tuning schedule of a benchmark's arms (led by a space; '' for a budget record without the
    fine-tuning lengths)."""
    from nnssl_joint.experiments.budgets import warmup_epochs_of

    if "finetune_warmup_epochs" not in budget or "finetune_epochs" not in budget:
        return ""
    warmup = warmup_epochs_of(budget["finetune_warmup_epochs"], budget["finetune_epochs"], recipe)
    if not warmup:
        return " Every arm fine-tunes with the same schedule, nnU-Net's poly decay, no warm-up."
    return (f" Runs from pretrained weights warm up for {warmup} epoch(s) (recipe {recipe}); scratch and "
            "stock nnU-Net do not, so a pretrained arm's difference includes its schedule.")


def render_benchmark_markdown(data: dict[str, Any]) -> str:
    s = data["settings"]
    summary = data["summary"]
    ks = [str(k) for k in s["labeled"]]
    sources = ", ".join(f"`{p}`" for p in data.get("pretraining_sources") or []) or "(none)"
    lines = ["# nnssl_joint label-efficiency benchmark", "",
             (f"Target `{data['target']}`, pretraining on {sources}; configuration `{s['configuration']}`; "
              f"{s['seeds']} seed(s); budget {json.dumps(s['budget'])}."
              + _schedule_sentence(s["budget"], s.get("recipe", "plugin"))
              + _recorded_settings(s, data["arms"])),
             (f"Finished runs: {data['finished_runs']} of {data['planned_runs']} "
              f"(report written {data['written']})."),
             "",
             (f"Test cases ({len(data.get('test_cases') or [])}, {data.get('test_source')}): their labels "
              "are read only by the evaluation after training; fine-tuning keeps nnU-Net's final "
              "checkpoint (no model selection) and validates on training-pool cases. Each seed draws its "
              "own labeled cases (nested across counts) and seeds the fine-tuning; every arm of a seed "
              "gets the same cases and seed, so gains are paired."), ""]
    lines += _summary_tables(summary, data["arms"], data["classes"], ks)
    lines += ["", "![label efficiency](benchmark.png)", "",
              ("Paired view: per seed, a line from each baseline to each arm (same cases and fine-tuning "
               "seed)."), "",
              "![paired](benchmark_paired.png)", "", "![per class](benchmark_classes.png)"]
    for held in (data.get("heldout") or {}).values():
        lines += _heldout_section(held, data, ks)
    lines += ["", "## Runs", "",
              ("| arm | labeled | seed | nnU-Net fold | mean Dice | validation cases "
               "| trainer / plans / network | run folder |"),
              "|---|---|---|---|---|---|---|---|"]
    for run in data["runs"].values():
        val = run.get("validation_cases")
        validated = "n/a" if val is None else (", ".join(val)
                                               + (" (the labeled cases)"
                                                  if run.get("validated_on_training_cases") else ""))
        network = str(run.get("network_class", "")).rsplit(".", 1)[-1]
        lines.append(f"| {run['arm']} | {run['labeled']} | {run['seed']} | {run['fold']} | "
                     f"{_fmt(run['mean_dice'])} | "
                     f"{validated} | {run.get('trainer', '')} / {run.get('plans_name', '')} / {network} | "
                     f"`{run['run_folder']}` |")
    if data.get("probe"):
        from nnssl_joint.probe.run import report_section

        lines += [""] + report_section(data["probe"])
    machine = data.get("machine", {})
    lines += ["", (f"Machine: {machine.get('cpus')} CPUs, {machine.get('platform')}, "
                   f"Python {machine.get('python')}; device {s['device']}."), ""]
    return "\n".join(lines) + "\n"


def write_benchmark_report(data: dict[str, Any], folder: Path) -> dict[str, Path]:
    """benchmark.json, benchmark.md and the figures (benchmark.png, benchmark_paired.png,
    benchmark_classes.png) in ``folder`` (each replaced atomically, so a
    report read while a long benchmark runs is always whole)."""
    from nnssl_joint.common.checkpoint_io import atomic_write_text

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    files = {"png": folder / "benchmark.png", "paired": folder / "benchmark_paired.png",
             "classes": folder / "benchmark_classes.png", "markdown": folder / "benchmark.md",
             "json": folder / "benchmark.json"}
    figures = {"png": lambda f: plot_label_efficiency(data["summary"], data["arms"], f),
               "paired": lambda f: plot_paired(data, f), "classes": lambda f: plot_class_bars(data, f)}
    for key, plot in figures.items():
        tmp_png = folder / f".{files[key].stem}.{os.getpid()}.tmp.png"  # several workers may write reports
        plot(tmp_png)
        tmp_png.replace(files[key])
    atomic_write_text(render_benchmark_markdown(data), files["markdown"])
    atomic_write_text(json.dumps(_json_ready(data), indent=2) + "\n", files["json"])
    return files
