"""Command line of nnssl_joint: ``nnssl_joint <subcommand> --help`` documents each step.

Subcommands register themselves through a ``register_cli(subparsers)`` function in their module, so
this file only assembles the parser. Modules are imported when the parser is built; they keep heavy
imports (torch, nnunetv2) inside their handlers where possible.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

#: modules that contribute subcommands, in the order they appear in ``--help``
_SUBCOMMAND_MODULES = (
    "nnssl_joint.datasets.synthetic",
    "nnssl_joint.planning.cli",
    "nnssl_joint.export",
    "nnssl_joint.experiments.demo",
    "nnssl_joint.experiments.benchmark",
    "nnssl_joint.probe.run",
)


def trainer_path() -> Path:
    """Folder to put into ``nnUNet_extTrainer`` (holds nnU-Net trainer modules only).

    In an editable checkout this is the repository's top-level ``trainers/`` folder; in an installed
    wheel it is the ``nnssl_joint/trainers`` package the wheel ships (same files).
    """
    import nnssl_joint.trainers as trainers_pkg

    return Path(trainers_pkg.__file__).resolve().parent


def _cmd_trainer_path(args: argparse.Namespace) -> int:
    print(trainer_path())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nnssl_joint",
        description="Joint 2D/3D self-supervised pretraining for nnU-Net v2 (intra-inter contrastive "
        "clustering). Typical order: make-synthetic (optional) -> prepare -> plan_and_preprocess -> "
        "nnUNetv2_train ... -tr JointSSLPretrainTrainer.",
    )
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    sub.required = True

    p = sub.add_parser(
        "trainer-path",
        help="print the folder to export as nnUNet_extTrainer",
        description="Print the folder holding the plugin's nnU-Net trainers. Use it as "
        "`export nnUNet_extTrainer=$(nnssl_joint trainer-path)` so that `nnUNetv2_train -tr ...` finds them.",
    )
    p.set_defaults(func=_cmd_trainer_path)

    for module_name in _SUBCOMMAND_MODULES:
        importlib.import_module(module_name).register_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        # our own errors carry the file/field and the fix; a traceback adds nothing for the user
        from nnssl_joint.errors import NnsslJointError

        if isinstance(e, NnsslJointError):
            print(f"nnssl_joint {args.command}: error: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
