"""``nnssl_joint prepare`` and ``nnssl_joint plan_and_preprocess``.

:func:`register_cli` adds both subcommands to the top-level parser (``nnssl_joint/cli.py``). The
handlers import nnU-Net only when they run, so building the parser stays cheap. ``python -m
nnssl_joint.planning.cli ...`` runs the same two subcommands on their own.
"""

from __future__ import annotations

import argparse
import sys

from nnssl_joint.errors import NnsslJointError
from nnssl_joint.planning.settings import DEFAULT_PLANS_NAME, PRETRAINING_CONFIGURATION, SpacingSpec


def _spacing_argument(value: str) -> SpacingSpec:
    try:
        return SpacingSpec.parse(value)
    except NnsslJointError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _cmd_prepare(args: argparse.Namespace) -> int:
    from nnssl_joint.planning.prepare import prepare_pretraining_dataset

    prepare_pretraining_dataset(args.dataset_ids, args.target_id, args.name, overwrite=args.overwrite)
    return 0


def _cmd_plan_and_preprocess(args: argparse.Namespace) -> int:
    from nnunetv2.configuration import default_num_processes

    if args.downstream:
        from nnssl_joint.planning.downstream import plan_and_preprocess_downstream

        for dataset_id in args.dataset_ids:
            plans = plan_and_preprocess_downstream(
                dataset_id, preset=args.preset,
                plans_name=args.plans_name,
                num_processes=args.np if args.np is not None else default_num_processes,
                num_processes_fingerprint=args.npfp if args.npfp is not None else default_num_processes,
                gpu_memory_target_in_gb=args.gpu_memory_target, verify=args.verify)
            for name, c in plans["configurations"].items():
                print(f"{name}: {c['architecture']['network_class_name']} patch {list(c['patch_size'])} "
                      f"batch {c['batch_size']} spacing {[round(float(x), 4) for x in c['spacing']]}")
        return 0
    if args.preset is not None:
        raise NnsslJointError("--preset only applies with --downstream; pretraining takes its preset from "
                              "the 'preset' key of the file named by NNSSL_JOINT_CONFIG")

    from nnssl_joint.planning.unlabeled import plan_and_preprocess_unlabeled

    options = {
        "spacing": args.spacing,
        "plans_name": args.plans_name,
        "num_processes": args.np if args.np is not None else default_num_processes,
        "num_processes_fingerprint": args.npfp if args.npfp is not None else default_num_processes,
        "verify": args.verify,
    }
    for dataset_id in args.dataset_ids:
        plan_and_preprocess_unlabeled(dataset_id, **options)
    return 0


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``prepare`` and ``plan_and_preprocess`` subcommands to ``subparsers``."""
    p = subparsers.add_parser(
        "prepare",
        help="merge raw nnU-Net datasets (2D and 3D) into one unlabeled pretraining dataset",
        description="Merge raw nnU-Net datasets (imagesTr + dataset.json; labelsTr optional and ignored; any "
        "format nnU-Net reads, 2D or 3D) into $nnUNet_raw/DatasetNEW_ID_NAME: every case rewritten as "
        ".nii.gz with its spacing (2D images as one-slice volumes, slice spacing 999), case ids prefixed "
        "with the source id (D501_case), a dataset.json and a provenance.json recording each case's source, "
        "dimensionality, original spacing/shape and modality. Nothing is written if any check fails.",
    )
    p.add_argument("-d", dest="dataset_ids", type=int, nargs="+", required=True, metavar="ID",
                   help="ids of the raw datasets to merge")
    p.add_argument("-o", dest="target_id", type=int, required=True, metavar="NEW_ID",
                   help="id of the merged dataset (must be unused unless --overwrite)")
    p.add_argument("--name", required=True, help="name of the merged dataset (DatasetNEW_ID_NAME)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset with id NEW_ID")
    p.set_defaults(func=_cmd_prepare)

    p = subparsers.add_parser(
        "plan_and_preprocess",
        help="fingerprint, plan and preprocess unlabeled datasets for pretraining (no labels needed)",
        description="nnU-Net fingerprinting, planning and preprocessing without labels, with nnU-Net's "
        f"classes subclassed. Writes plans '{DEFAULT_PLANS_NAME}' with the 2D-type configuration "
        f"'{PRETRAINING_CONFIGURATION}' (volumes keep all slices, 2D images stay one slice), preprocesses "
        f"into $nnUNet_preprocessed/DatasetXXX/{DEFAULT_PLANS_NAME}_{PRETRAINING_CONFIGURATION}, checks "
        "every case and prints a summary table.",
    )
    p.add_argument("-d", dest="dataset_ids", type=int, nargs="+", required=True, metavar="ID",
                   help="dataset ids to process")
    p.add_argument("-np", type=int, default=None, metavar="N",
                   help="processes for preprocessing (default: nnU-Net's default_num_processes, 8 unless "
                   "$nnUNet_def_n_proc)")
    p.add_argument("-npfp", type=int, default=None, metavar="N",
                   help="processes for fingerprint extraction (default as -np)")
    p.add_argument("--spacing", type=_spacing_argument, default=SpacingSpec("median"),
                   metavar="median|native|MM",
                   help="in-plane target spacing: 'median' of the dataset (default), 'native' (no "
                   "resampling, each case keeps its own spacing) or a spacing in mm; the slice axis is never "
                   "resampled")
    p.add_argument("--plans-name", default=DEFAULT_PLANS_NAME,
                   help=f"plans identifier (default {DEFAULT_PLANS_NAME})")
    p.add_argument("--downstream", action="store_true",
                   help="plan a LABELED dataset for fine-tuning instead: nnU-Net's fingerprint, the plugin's "
                   f"planner (plans '{DEFAULT_PLANS_NAME}' with '2d' = JointSSLUNet2D and '3d_fullres' = "
                   "SliceWiseUNet3D, encoder topology fixed by --preset, spacing/patch/batch self-configured "
                   "as in nnU-Net) and nnU-Net's DefaultPreprocessor")
    p.add_argument("--preset", default=None, metavar="cpu|gpu|FILE.json",
                   help="architecture preset for --downstream (default cpu); must be the pretraining run's "
                        "preset")
    p.add_argument("--gpu-memory-target", type=float, default=8.0, metavar="GB",
                   help="memory target of nnU-Net's patch/batch size heuristics for --downstream (default 8)")
    p.add_argument("--verify", action="store_true",
                   help="also decompress every preprocessed case, check its voxels are finite and report the "
                   "per-case mean/std after normalisation")
    p.set_defaults(func=_cmd_plan_and_preprocess)


def main(argv: list[str] | None = None) -> int:
    """Run ``prepare`` / ``plan_and_preprocess`` without the top-level CLI."""
    parser = argparse.ArgumentParser(prog="nnssl_joint",
                                     description="dataset preparation and unlabeled planning")
    subparsers = parser.add_subparsers(dest="command", metavar="<command>", required=True)
    register_cli(subparsers)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except NnsslJointError as e:
        print(f"nnssl_joint {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
