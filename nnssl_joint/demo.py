"""Demo (work in progress)."""
from __future__ import annotations

import argparse


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("demo", help="run the end-to-end demo")
    p.set_defaults(func=lambda a: 0)
