#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the test suite. Extra arguments go to pytest, e.g.
#   bash scripts/test.sh -m slow          # only the long end-to-end runs
#   bash scripts/test.sh -m "slow or not slow"   # everything
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$repo/scripts/setup.sh"
venv="${NNSSL_VENV:-$repo/.venv}"
cd "$repo"
if [ "$#" -eq 0 ]; then
    set -- -m "not slow"
fi
exec "$venv/bin/python" -m pytest -p no:cacheprovider "$@"
