"""Deterministic, in-process pretraining ablation harness; prints one JSON document.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/ssl_ablation.py --work /tmp/ssl_abl --tag base \
        --config '{"objective": {"lambda_mask": 0}}' --seeds 0 1 --epochs 4 --iterations 25

1. Data (once per --work folder): ``make_synthetic`` (seed --data-seed, the demo's ``small`` sizes: 8 volumes
   32^3, 16 PNGs 64^2, labeled task 503 with 3 + 4 cases), ``prepare`` 501 + 502 -> 900 and
   ``plan_and_preprocess`` (or --preprocessed pointing at an existing nnU-Net preprocessed root holding
   Dataset900). Held-back volumes: the labeled task's images (imagesTr + imagesTs), never in pretraining,
   z-scored like nnU-Net's ZScoreNormalization.
2. Per seed: nnU-Net's ``run_training`` of JointSSLPretrainTrainer in this process (``-device cpu``,
   ``nnUNet_n_proc_DA=0``: deterministic), config = --config merged over {seed, epochs, iterations}.
3. Read-outs: the run's last-epoch training log (L_inter vs log K_3D, 2D/3D usage entropy, collapse
   warnings) and :func:`nnssl_joint.ssl.diagnostics.volume_diagnostics` on non-overlapping held-back
   windows (two augmented views each, the run's own view pipeline, one draw seeded by the run's seed), and
   ``held_back_draws``: the view-dependent read-outs pooled over --view-draws draws with 95% intervals over
   held-back volumes (:func:`nnssl_joint.ssl.diagnostics.view_draw_readouts`). Judge bar 1 on those: one
   draw moves Z top-1 by several windows, and seed 0's draw is an easy one (docs/pretraining.md,
   fourteenth pass).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from nnssl_joint.naming import PLANS_NAME as PLANS
from nnssl_joint.naming import PRETRAIN_TRAINER as TRAINER

PRETRAIN_ID = 900
PRETRAIN_NAME = "JointPretrain"
IDS = (501, 502, 503)
REPO = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def environment(values: dict[str, str]):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def nnunet_env(raw: Path, pre: Path, res: Path, **extra: str):
    return environment({"nnUNet_raw": str(raw), "nnUNet_preprocessed": str(pre), "nnUNet_results": str(res),
                        "nnUNet_extTrainer": str(REPO / "trainers"), "nnUNet_def_n_proc": "1", **extra})


def build_data(work: Path, data_seed: int, preprocessed: Path | None) -> tuple[Path, Path]:
    raw = work / "raw"
    pre = preprocessed or work / "pre"
    if not (raw / "Dataset503_SynthLabeled3D").is_dir() and not any(raw.glob("Dataset503_*")):
        from nnssl_joint.datasets.synthetic import make_synthetic

        make_synthetic(raw, seed=data_seed, n_3d=8, n_2d=16, n_labeled_train=3, n_labeled_test=4, ids=IDS)
    if not any(pre.glob(f"Dataset{PRETRAIN_ID}_*/{PLANS}_joint_ssl")):
        if preprocessed is not None:
            raise SystemExit(f"--preprocessed {pre} holds no Dataset{PRETRAIN_ID}_*/{PLANS}_joint_ssl")
        from nnssl_joint.planning import plan_and_preprocess_unlabeled, prepare_pretraining_dataset

        with nnunet_env(raw, pre, work / "res"):  # the plugin's planning works with any nnUNet_n_proc_DA
            prepare_pretraining_dataset(list(IDS[:2]), PRETRAIN_ID, PRETRAIN_NAME)
            plan_and_preprocess_unlabeled(PRETRAIN_ID, num_processes=1, num_processes_fingerprint=1)
    return raw, pre


def held_back_volumes(raw: Path) -> dict[str, np.ndarray]:
    import SimpleITK as sitk

    folder = next(raw.glob(f"Dataset{IDS[2]}_*"))
    out = {}
    for sub in ("imagesTr", "imagesTs"):
        for path in sorted((folder / sub).glob("*_0000.nii.gz")):
            image = sitk.GetArrayFromImage(sitk.ReadImage(str(path))).astype(np.float32)
            out[path.name] = ((image - image.mean()) / max(float(image.std()), 1e-8))[None]
    return out


def extra_held_back_volumes(work: Path, data_seed: int, count: int) -> dict[str, np.ndarray]:
    """``count`` more volumes of the labeled task's kind for the spread read-outs: ``make_synthetic`` with
    the generator's defaults and seed ``data_seed + 1`` (other cases than the pretraining pool's and the
    labeled task's), in ``work/raw_extra_<count>``; pretraining never sees them either."""
    if count <= 0:
        return {}
    from nnssl_joint.datasets.synthetic import make_synthetic

    raw = work / f"raw_extra_{count}"
    make_synthetic(raw, seed=data_seed + 1, n_3d=1, n_2d=1, n_labeled_train=count, n_labeled_test=0, ids=IDS)
    return {f"extra_{name}": volume for name, volume in held_back_volumes(raw).items()}


def merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def train(raw: Path, pre: Path, res: Path, config: dict) -> Path:
    import torch
    from nnunetv2.run.run_training import run_training

    if res.exists():
        shutil.rmtree(res)
    res.mkdir(parents=True)
    config_file = res / "config.json"
    config_file.write_text(json.dumps(config, indent=2))
    with nnunet_env(raw, pre, res, NNSSL_JOINT_CONFIG=str(config_file), nnUNet_n_proc_DA="0"):
        run_training(str(PRETRAIN_ID), "joint_ssl", "all", TRAINER, PLANS, device=torch.device("cpu"))
    return next(res.glob(f"*/{TRAINER}__{PLANS}__joint_ssl/fold_all"))


def load_model(checkpoint: Path):
    try:  # the shared loader (pretrain/checkpoint.py) once it exists; else the trainer's record, rebuilt here
        from nnssl_joint.pretrain.checkpoint import load_pretraining_model

        return load_pretraining_model(checkpoint)
    except ImportError:
        import torch

        from nnssl_joint.models.preset import ArchitecturePreset
        from nnssl_joint.pretrain.model import JointSSLModel
        from nnssl_joint.ssl.objective import ObjectiveConfig

        ckpt = torch.load(checkpoint, map_location="cpu", weights_only=False)
        meta = ckpt["nnssl_joint"]
        objective = {**meta["config"]["objective"], **{k: meta["resolved"][k] for k in (
            "num_prototypes_2d", "num_prototypes_3d")}}
        model = JointSSLModel(ArchitecturePreset.from_dict(meta["preset"]), int(meta["input_channels"]),
                              ObjectiveConfig.from_dict(objective))
        model.load_state_dict(ckpt["network_weights"])
        return model.eval(), meta


def windows_of(volumes: dict[str, np.ndarray], n: int):
    """Non-overlapping windows of ``n`` slices (the last one zero-padded), their valid slices and the index
    of the volume each comes from."""
    import torch

    windows, valid, groups = [], [], []
    for g, volume in enumerate(volumes.values()):
        z = volume.shape[1]
        starts = [0] if z <= n else list(range(0, z - n + 1, n))  # non-overlapping windows
        for s in starts:
            stack = torch.from_numpy(np.ascontiguousarray(volume[:, s:s + n]))
            pad = n - stack.shape[1]
            if pad:
                stack = torch.cat([stack, torch.zeros((stack.shape[0], pad, *stack.shape[2:]))], 1)
            windows.append(stack)
            valid.append(torch.arange(n) < n - pad)
            groups.append(g)
    return torch.stack(windows), torch.stack(valid), groups


def evaluate(run_dir: Path, volumes: dict[str, np.ndarray], seed: int,
             checkpoint: str = "checkpoint_final.pth", view_draws: int = 1,
             extra_volumes: dict[str, np.ndarray] | None = None) -> dict:
    """The read-outs of one run folder. ``view_draws`` > 1 or ``extra_volumes``: also the view-dependent
    read-outs pooled over that many draws of the two views, with intervals over volumes
    (``held_back_draws``: the labeled task's windows, draw 0 being the one of the plain read-outs;
    ``held_back_draws_extended``: those and the extra volumes' windows, one gallery)."""
    import torch

    from nnssl_joint.data.augment import STRONG, WEAK, volume_view_transforms
    from nnssl_joint.ssl.diagnostics import view_draw_readouts, volume_diagnostics, window_features

    ckpt = torch.load(run_dir / checkpoint, map_location="cpu", weights_only=False)
    log = ckpt["logging"]
    model, meta = load_model(run_dir / checkpoint)
    resolved = meta["resolved"]
    n, view = int(resolved["n_slices"]), int(resolved["view_size"])
    k2, k3 = int(resolved["num_prototypes_2d"]), int(resolved["num_prototypes_3d"])
    strength = {"weak": WEAK, "strong": STRONG}[meta["config"]["data"]["augmentation"]]
    transform = volume_view_transforms((view, view), config=strength)
    raw_windows, valid_t, groups = windows_of(volumes, n)
    extra = windows_of(extra_volumes, n) if extra_volumes else None

    def resize(stack):
        return torch.nn.functional.interpolate(stack.flatten(1, 2), size=(view, view), mode="bilinear",
                                               align_corners=False).view(*stack.shape[:3], view, view)

    def draw_views(stack, mask):  # two views per window through the run's own view pipeline, full size
        views = [torch.stack([transform(image=w.clone())["image"] for w in stack]) for _ in range(2)]
        for v in views:
            v[~mask[:, None, :, None, None].expand_as(v)] = 0
        return views

    resized = resize(raw_windows)
    state = torch.get_rng_state(), np.random.get_state()
    torch.manual_seed(seed)
    np.random.seed(seed)
    try:  # draw 0 of the labeled task's windows first: the plain read-outs are those of earlier versions
        draws = [draw_views(raw_windows, valid_t) for _ in range(max(1, view_draws))]
        extra_draws = [draw_views(extra[0], extra[1]) for _ in draws] if extra else []
    finally:
        torch.set_rng_state(state[0])
        np.random.set_state(state[1])
    views = draws[0]
    diag = volume_diagnostics(model, resized, valid_t, views[0], views[1], seed=seed)
    spread = {}
    if view_draws > 1 or extra:
        features = [tuple(window_features(model, v, valid_t) for v in pair) for pair in draws]
        plain_z = window_features(model, resized, valid_t)["z"]
        spread["held_back_draws"] = view_draw_readouts(features, plain_z, groups, seed=seed)
        if extra:
            extra_features = [tuple(window_features(model, v, extra[1]) for v in pair)
                              for pair in extra_draws]
            joined = [tuple({key: torch.cat([f[key], g[key]]) for key in ("z", "head", "scores_3d")}
                            for f, g in zip(pair, extra_pair))
                      for pair, extra_pair in zip(features, extra_features)]
            plain_extra = window_features(model, resize(extra[0]), extra[1])["z"]
            offset = max(groups) + 1
            spread["held_back_draws_extended"] = view_draw_readouts(
                joined, torch.cat([plain_z, plain_extra]), groups + [g + offset for g in extra[2]], seed=seed)
    last = {key: float(log[key][-1]) for key in ("loss_intra", "loss_intra_3d", "loss_inter", "loss_mask",
                                                 "loss_volume_contrast", "entropy_2d", "entropy_3d")
            if log.get(key)}
    log_text = (run_dir / next(p.name for p in run_dir.glob("training_log_*.txt"))).read_text()
    warnings = log_text.count("possible cluster collapse")
    uniform_warnings = log_text.count("no clustering signal")
    out = {"train_last_epoch": last, "log_k3d": math.log(k3), "log_k2d": math.log(k2),
           "inter_over_log_k3d": last.get("loss_inter", float("nan")) / math.log(k3),
           "entropy_3d_per_epoch": [round(float(v), 3) for v in log.get("entropy_3d", [])],
           "inter_per_epoch": [round(float(v), 3) for v in log.get("loss_inter", [])],
           "collapse_warnings": warnings, "uniform_code_warnings": uniform_warnings,
           "resolved": {k: resolved[k] for k in (
               "view_size", "n_slices", "batch_size_2d", "batch_size_3d", "num_prototypes_2d",
               "num_prototypes_3d")}}
    out.update(diag)
    out.update(spread)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/ssl_abl"))
    parser.add_argument("--preprocessed", type=Path, default=None)
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--config", default="{}", help="partial NNSSL_JOINT_CONFIG as JSON text or a file")
    parser.add_argument("--tag", default="run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--iterations", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--keep", action="store_true", help="keep the run folders")
    parser.add_argument("--evaluate", type=Path, default=None, metavar="RUN_FOLDER",
                        help="only evaluate an existing run folder (holding --checkpoint) with --seeds[0]")
    parser.add_argument("--checkpoint", default="checkpoint_final.pth",
                        help="with --evaluate: checkpoint file of the run folder (e.g. checkpoint_best.pth)")
    parser.add_argument("--view-draws", type=int, default=10,
                        help="draws of the two views for the view-dependent read-outs (top-1, 3D usage), "
                             "pooled with 95%% intervals over held-back volumes (default 10; 1: only the "
                             "plain read-outs of one draw, as before 2026-12-04)")
    parser.add_argument("--extra-held-back", type=int, default=0, metavar="N",
                        help="N more generated volumes of the labeled task's kind (data seed + 1) for the "
                             "pooled read-outs, in one gallery with the labeled task's windows")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    text = Path(args.config).read_text() if os.path.isfile(args.config) else args.config
    partial = json.loads(text)
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    raw, pre = build_data(work, args.data_seed, args.preprocessed)
    volumes = held_back_volumes(raw)
    extra = extra_held_back_volumes(work, args.data_seed, args.extra_held_back)
    if args.evaluate is not None:
        print(json.dumps({"tag": args.tag, "evaluated": str(args.evaluate),
                          **evaluate(args.evaluate.resolve(), volumes, args.seeds[0], args.checkpoint,
                                     args.view_draws, extra)},
                         indent=1))
        return 0
    runs = {}
    for seed in args.seeds:
        config = merge({"seed": seed, "optim": {"num_epochs": args.epochs,
                                                "iterations_per_epoch": args.iterations,
                                                "save_every": args.epochs}}, partial)
        start = time.time()
        res = work / f"res_{args.tag}_s{seed}"
        with contextlib.redirect_stdout(sys.stderr):
            run_dir = train(raw, pre, res, config)
        runs[str(seed)] = {**evaluate(run_dir, volumes, seed, view_draws=args.view_draws,
                                      extra_volumes=extra),
                           "seconds": round(time.time() - start, 1)}
        (work / f"{args.tag}_s{seed}.json").write_text(json.dumps(runs[str(seed)], indent=1))
        if not args.keep:
            shutil.rmtree(res)
    keys = ("entropy_2d", "entropy_3d", "inter_over_log_k3d", "z_top1_cross_view", "z_mean_pairwise_cosine",
            "rankme_slices", "rankme_z", "mask_ratio_vs_interp")
    summary = {}
    for key in keys:
        values = [r[key] for r in runs.values()]
        summary[key] = {"mean": float(np.mean(values)), "min": float(np.min(values)),
                        "max": float(np.max(values))}
    print(json.dumps({"tag": args.tag, "config": partial, "seeds": args.seeds, "epochs": args.epochs,
                      "iterations": args.iterations, "summary": summary, "runs": runs}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
