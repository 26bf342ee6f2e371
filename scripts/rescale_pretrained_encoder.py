"""Rescale the encoder convolutions of an exported pretrained-weights file to nnU-Net's initial weight norm,
in place (temp file, then rename), printing the factors.

``nnssl_joint export --encoder-scale nnunet`` does the same for a new file
(``nnssl_joint.export.scale_encoder_to_nnunet_init`` says why, and what it measured); this script rescales
files already exported, e.g. the ``pretrained_for_*.pth`` written at the end of pretraining (which keep the
pretraining's scale); a file that was rescaled already is refused.

    python scripts/rescale_pretrained_encoder.py RUN/fold_all/pretrained_for_3d_fullres.pth [more files]
"""
import json
import sys
from pathlib import Path

from nnssl_joint.common.checkpoint_io import atomic_torch_save
from nnssl_joint.export import RESCALE_RECORD, load_pretraining_checkpoint, scale_encoder_to_nnunet_init

if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    for path in map(Path, sys.argv[1:]):
        ckpt = load_pretraining_checkpoint(path)
        meta = ckpt["nnssl_joint"]
        if meta.get(RESCALE_RECORD):
            raise SystemExit(f"{path} was rescaled before (factors {meta[RESCALE_RECORD]}); nothing done")
        ckpt["network_weights"], meta[RESCALE_RECORD] = scale_encoder_to_nnunet_init(ckpt["network_weights"])
        atomic_torch_save(ckpt, path)
        print(json.dumps({"file": str(path), "factors": meta[RESCALE_RECORD]}))
