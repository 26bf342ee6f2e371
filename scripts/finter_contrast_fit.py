"""Can f_inter learn to tell windows apart, and at which learning rate? Prints one JSON line per setting.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/finter_contrast_fit.py CHECKPOINT VOLUME_FOLDER \
        --lr 3e-3 1e-3 3e-4 --dropout 0.1 [--steps 300]

The encoder and g of CHECKPOINT (a pretraining checkpoint) are frozen; for every setting a fresh f_inter
(the checkpoint's preset, initialised with each of --seeds) is trained with AdamW (weight decay 0.05, no
warm-up) on the contrastive volume term alone (:class:`nnssl_joint.ssl.volume_contrast.VolumeContrast`,
temperature 0.2, no queue), all windows in one batch: windows of N slices every N/2 slices of every volume in
VOLUME_FOLDER (z-scored, slices resized to the view size), two copies of each with independent Gaussian noise
(sd 0.05) as the two views; windows of one volume are never negatives. Reported every 100 steps: the loss
(chance level is log(1 + negatives)) and the mean pairwise cosine of Z in eval mode. Used for
docs/pretraining.md (seventh pass).
"""

from __future__ import annotations

import argparse
import glob
import json
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ssl_ablation import load_model

from nnssl_joint.models.encoder import build_slice_transformer
from nnssl_joint.probe.diagnostics import mean_pairwise_cosine
from nnssl_joint.ssl.volume_contrast import VolumeContrast


def windows(folder: str, n: int, view: int) -> tuple[torch.Tensor, torch.Tensor]:
    out, case = [], []
    files = sorted(glob.glob(str(Path(folder) / "*.nii.gz")))
    if not files:
        raise SystemExit(f"no .nii.gz volumes in {folder}")
    for number, path in enumerate(files):
        v = sitk.GetArrayFromImage(sitk.ReadImage(path)).astype(np.float32)
        v = (v - v.mean()) / (v.std() + 1e-8)
        for start in range(0, v.shape[0] - n + 1, max(1, n // 2)):
            t = torch.from_numpy(np.ascontiguousarray(v[start:start + n]))[None]
            out.append(F.interpolate(t, size=(view, view), mode="bilinear", align_corners=False))
            case.append(number)
    return torch.stack(out), torch.tensor(case)


def fit(model, emb_a: torch.Tensor, emb_b: torch.Tensor, case: torch.Tensor, lr: float, dropout: float,
        steps: int, seed: int) -> dict:
    torch.manual_seed(seed)
    valid = torch.ones(emb_a.shape[:2], dtype=torch.bool)
    f_inter = build_slice_transformer(model.preset)
    for module in f_inter.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = dropout
    term = VolumeContrast(emb_a.shape[-1], temperature=0.2, queue_length=0)
    optimizer = torch.optim.AdamW(f_inter.parameters(), lr=lr, weight_decay=0.05)

    def cosine() -> float:
        f_inter.eval()
        with torch.no_grad():
            value = mean_pairwise_cosine(f_inter(emb_a, valid)[1])
        f_inter.train()
        return round(value, 5)

    result = {"seed": seed, "lr": lr, "dropout": dropout, "windows": len(case), "cos_at_init": cosine(),
              "steps": {}}
    for step in range(steps + 1):
        optimizer.zero_grad()
        loss = term(f_inter(emb_a, valid)[1], f_inter(emb_b, valid)[1], case)
        loss.backward()
        optimizer.step()
        if step % 100 == 0:
            result["steps"][step] = {"loss": round(float(loss.detach()), 3), "z_cos": cosine()}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("volumes")
    parser.add_argument("--lr", type=float, nargs="+", default=[3e-3, 1e-3, 3e-4])
    parser.add_argument("--dropout", type=float, nargs="+", default=[0.1])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds of f_inter's initialisation")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model, meta = load_model(args.checkpoint)
    model.eval()
    n, view = int(meta["resolved"]["n_slices"]), int(meta["resolved"]["view_size"])
    w, case = windows(args.volumes, n, view)
    with torch.no_grad():
        def embed(x: torch.Tensor) -> torch.Tensor:
            flat = x.permute(0, 2, 1, 3, 4).reshape(-1, x.shape[1], view, view)
            return model.embed_slices(flat).view(x.shape[0], n, -1)
        emb_a, emb_b = embed(w + 0.05 * torch.randn_like(w)), embed(w + 0.05 * torch.randn_like(w))
    for seed in args.seeds:
        for lr in args.lr:
            for dropout in args.dropout:
                print(json.dumps({"checkpoint": args.checkpoint, **fit(model, emb_a, emb_b, case, lr, dropout,
                                                                       args.steps, seed)}), flush=True)


if __name__ == "__main__":
    main()
