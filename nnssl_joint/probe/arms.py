"""Arm-level probe comparisons over pretraining seeds: ``python scripts/probe_arms.py``.

One probe of one pretraining run says little: runs of one configuration differ by several Dice points from
seed to seed (docs/pretraining.md, third pass). An *arm* is a configuration pretrained with several seeds;
each seed's weights are probed (``nnssl_joint probe``, possibly several invocations on the same target and
``--seed``) and this module compares

* each arm with the random initialisations (``--random-seeds`` of one of the invocations), and
* each pair of arms (the second named minus the first),

on the mean over test cases of each case's mean Dice over classes (the statistic ``probe.json`` compares
with random), with percentile bootstrap 95% intervals that resample, in every draw, the pretraining seeds of
each arm, the random initialisations, and the test cases (one draw of cases shared by every arm and the
random runs: the comparison is paired by case).
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from nnssl_joint.errors import NnsslJointError

#: bootstrap draws of :func:`compare_arms`
ARM_BOOTSTRAP_SAMPLES = 10_000


def _read_probe(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError as exc:
        raise NnsslJointError(f"{path}: no such probe.json (nnssl_joint probe --out DIR writes one)") from exc
    except json.JSONDecodeError as exc:
        raise NnsslJointError(f"{path}: not valid JSON ({exc}); not a probe.json of nnssl_joint probe?") \
            from exc
    for key in ("target", "weights", "random_runs"):
        if key not in data:
            raise NnsslJointError(f"{path}: no {key!r} key; is it a probe.json of nnssl_joint probe?")
    return data


def _case_means(run: dict[str, Any], readout: str, cases: Sequence[str], where: str,
                label_class: int | None = None) -> np.ndarray:
    """Per-case mean Dice over the foreground classes, or one class's Dice (``label_class``, 1 = the first
    foreground label; NaN where a case has neither prediction nor reference of it)."""
    per_case = run["dice"][readout]["per_case"]
    missing = [case for case in cases if case not in per_case]
    if missing:
        raise NnsslJointError(f"{where}: {run['name']!r} has no {readout} Dice for test case(s) {missing}")
    matrix = np.array([per_case[case] for case in cases], dtype=np.float64)
    if label_class is None:
        return np.nanmean(matrix, axis=1)
    if not 1 <= label_class <= matrix.shape[1]:
        raise NnsslJointError(f"{where}: --class {label_class}, but {run['name']!r} has Dice of "
                              f"{matrix.shape[1]} foreground classes (1..{matrix.shape[1]})")
    return matrix[:, label_class - 1]


def load_probe_runs(paths: Sequence[Path], readout: str = "logistic", label_class: int | None = None,
                    require_random: bool = True) -> tuple[dict[str, np.ndarray], np.ndarray, list[str]]:
    """Per-case mean Dice of every probed weights file in ``paths`` (by its name in the table) and of the
    random initialisations (rows: the random runs of every file, one row per seed, which must agree where
    two files drew the same seed). The files must come from one target, one configuration and one test-case
    list; returns ``(weights, random, test_cases)``. ``label_class`` K: the Dice of foreground class K per
    case instead of the mean over classes (``scripts/probe_arms.py --class K``). ``require_random=False``
    accepts files without random initialisations (``random`` then has no rows): enough for arm - arm
    comparisons, which do not use them."""
    if not paths:
        raise NnsslJointError("no probe.json given")
    reference: tuple[Any, ...] | None = None
    weights: dict[str, np.ndarray] = {}
    random_by_seed: dict[int, np.ndarray] = {}
    cases: list[str] = []
    for path in paths:
        data = _read_probe(Path(path))
        target = data["target"]
        settings = data.get("settings", {})
        # norm_slices: the encoder statistics of the read-out (--statistics; files before it read per slice);
        # volume_context: f_inter's output in the features (--volume-context; files before it had none)
        key = (target.get("dataset"), target.get("configuration"), tuple(target.get("test_cases", ())),
               settings.get("seed"), int(settings.get("norm_slices", 1)),
               int(settings.get("volume_context", 0)), int(settings.get("volume_context_dims", 0)))
        if reference is None:
            reference, cases = key, list(key[2])
        elif key != reference:
            def describe(k: tuple[Any, ...]) -> str:
                return (f"{k[0]} ({k[1]}, {len(k[2])} test cases, --seed {k[3]}, encoder statistics over "
                        f"{k[4]} slice(s), " + (f"f_inter context over {k[5]} slices" if k[5] else
                                                "no f_inter context")
                        + (f", {k[6]} principal components)" if k[6] else ")"))
            raise NnsslJointError(
                f"{path}: probed {describe(key)}, the first file {paths[0]} probed {describe(reference)}; "
                "compare probes of one target, configuration, --seed, --statistics, --volume-context and "
                "--volume-context-dims only")
        for run in data["weights"]:
            if run["name"] in weights:
                raise NnsslJointError(f"{path}: the weights name {run['name']!r} appears twice among the "
                                      f"files; name each run (nnssl_joint probe --weights NAME=PATH)")
            weights[run["name"]] = _case_means(run, readout, cases, str(path), label_class)
        for run in data["random_runs"]:
            values = _case_means(run, readout, cases, str(path), label_class)
            seed = int(run["seed"])
            if seed in random_by_seed and not np.allclose(random_by_seed[seed], values, equal_nan=True):
                raise NnsslJointError(f"{path}: random initialisation seed {seed} gives other Dice than in "
                                      f"an earlier file; probe with the same code and --threads")
            random_by_seed[seed] = values
    if not random_by_seed:
        if require_random:
            raise NnsslJointError(f"none of {[str(p) for p in paths]} has random initialisations; run one of "
                                  f"the probes with --random-seeds 5 (or compare two arms, which needs none)")
        return weights, np.empty((0, len(cases))), cases
    random = np.stack([random_by_seed[seed] for seed in sorted(random_by_seed)])
    return weights, random, cases


def group_arms(weights: Mapping[str, np.ndarray], patterns: Mapping[str, str]) -> dict[str, list[str]]:
    """Arm name -> the weights names that match its shell-style pattern (``fnmatch``, e.g. ``joint_s*``),
    sorted. Every arm needs at least one match, and no weights name may fall into two arms."""
    arms: dict[str, list[str]] = {}
    seen: dict[str, str] = {}
    for arm, pattern in patterns.items():
        names = sorted(name for name in weights if fnmatch.fnmatchcase(name, pattern))
        if not names:
            raise NnsslJointError(f"arm {arm!r}: no probed weights name matches {pattern!r}; names: "
                                  f"{sorted(weights)}")
        for name in names:
            if name in seen:
                raise NnsslJointError(f"weights {name!r} match the patterns of arms {seen[name]!r} and "
                                      f"{arm!r}")
            seen[name] = arm
        arms[arm] = names
    return arms


def _interval(draws: np.ndarray) -> tuple[float, float]:
    low, high = np.nanpercentile(draws, [2.5, 97.5])  # NaN: a draw of cases without the class (--class)
    return float(low), float(high)


def compare_arms(weights: Mapping[str, np.ndarray], random: np.ndarray, arms: Mapping[str, Sequence[str]],
                 samples: int = ARM_BOOTSTRAP_SAMPLES, seed: int = 0) -> dict[str, Any]:
    """Arm means, arm - random and every pairwise difference (later arm minus earlier), with percentile
    bootstrap 95% intervals (module docstring). ``weights``: name -> (cases,) per-case Dice; ``random``:
    (random seeds, cases), or no rows: then ``result["random"]`` is None and the arms carry no minus-random
    entries (the draws then differ from those with random rows, so the arm - arm intervals of the two calls
    agree in distribution, not to the digit); ``arms``: arm -> weights names (its pretraining seeds)."""
    rng = np.random.default_rng(seed)
    n_cases = random.shape[1]
    has_random = random.shape[0] > 0
    seeds = {arm: np.stack([weights[name] for name in names]) for arm, names in arms.items()}
    arm_draws = {arm: np.empty(samples) for arm in arms}
    random_draws = np.empty(samples)
    for i in range(samples):
        cases = rng.integers(0, n_cases, n_cases)
        if has_random:
            rows = rng.integers(0, random.shape[0], random.shape[0])
            random_draws[i] = np.nanmean(random[np.ix_(rows, cases)])
        for arm, table in seeds.items():
            picked = rng.integers(0, table.shape[0], table.shape[0])
            arm_draws[arm][i] = np.nanmean(table[np.ix_(picked, cases)])
    random_mean = float(np.nanmean(random)) if has_random else None
    result: dict[str, Any] = {
        "random": {"mean": random_mean, "per_seed": np.nanmean(random, axis=1).tolist(),
                   "interval": _interval(random_draws)} if has_random else None,
        "arms": {}, "differences": {}, "samples": samples, "cases": n_cases,
    }
    for arm, table in seeds.items():
        mean = float(np.nanmean(table))
        entry = {"weights": list(arms[arm]), "per_seed": np.nanmean(table, axis=1).tolist(), "mean": mean,
                 "interval": _interval(arm_draws[arm])}
        if has_random:
            entry["minus_random"] = mean - random_mean
            entry["minus_random_interval"] = _interval(arm_draws[arm] - random_draws)
        result["arms"][arm] = entry
    names = list(arms)
    for i, first in enumerate(names):
        for second in names[i + 1:]:
            difference = result["arms"][second]["mean"] - result["arms"][first]["mean"]
            result["differences"][f"{second} - {first}"] = {
                "difference": difference, "interval": _interval(arm_draws[second] - arm_draws[first]),
                "share_above_zero": float(np.mean(arm_draws[second] > arm_draws[first])),
            }
    return result


def render_table(result: dict[str, Any]) -> str:
    """Markdown tables of :func:`compare_arms`'s result, in Dice points (x100)."""
    def points(value: float) -> str:
        return f"{100 * value:+.1f}"

    def per_seed(values: list[float]) -> str:
        return ", ".join(f"{v:.3f}" for v in values)

    rnd = result["random"]
    if rnd is None:  # no random initialisations among the files: arms and their differences only
        lines = ["| arm | seeds | per seed | mean [95% CI] |", "| --- | --- | --- | --- |"]
        for arm, entry in result["arms"].items():
            low, high = entry["interval"]
            lines.append(f"| {arm} | {len(entry['per_seed'])} | {per_seed(entry['per_seed'])} | "
                         f"{entry['mean']:.3f} [{low:.3f}, {high:.3f}] |")
    else:
        lines = ["| arm | seeds | per seed | mean | arm - random [95% CI] |",
                 "| --- | --- | --- | --- | --- |"]
        lines.append(f"| random init | {len(rnd['per_seed'])} | {per_seed(rnd['per_seed'])} | "
                     f"{rnd['mean']:.3f} | |")
        for arm, entry in result["arms"].items():
            low, high = entry["minus_random_interval"]
            lines.append(f"| {arm} | {len(entry['per_seed'])} | {per_seed(entry['per_seed'])} | "
                         f"{entry['mean']:.3f} | {points(entry['minus_random'])} "
                         f"[{points(low)}, {points(high)}] |")
    if result["differences"]:
        lines += ["", "| comparison | difference [95% CI] | share of draws above 0 |", "| --- | --- | --- |"]
        for name, entry in result["differences"].items():
            low, high = entry["interval"]
            lines.append(f"| {name} | {points(entry['difference'])} [{points(low)}, {points(high)}] | "
                         f"{entry['share_above_zero']:.2f} |")
    return "\n".join(lines)
