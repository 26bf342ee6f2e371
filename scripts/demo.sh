#!/usr/bin/env bash
# Set up nnssl_joint from nothing (scripts/setup.sh), then run the end-to-end demo on generated data.
# Arguments go to the demo, e.g.
#   bash scripts/demo.sh                       # default: --budget small --labeled 2 --out ./demo_output
#   bash scripts/demo.sh --budget medium --out /tmp/demo_medium
#   bash scripts/demo.sh --real                # also pretrain on real images shipped inside PyPI packages
# Re-running with the same --out and flags continues an interrupted demo.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$repo/scripts/setup.sh"
venv="${NNSSL_VENV:-$repo/.venv}"
exec "$venv/bin/python" "$repo/scripts/demo.py" "$@"
