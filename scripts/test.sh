#!/usr/bin/env bash
# Set up (scripts/setup.sh), lint the whole tree (ruff, configured in pyproject.toml) and run the test
# suite. Extra arguments go to pytest, e.g.
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
echo "[test] ruff check (the linter configured in pyproject.toml, whole tree)"
"$venv/bin/ruff" check "$repo"
exec "$venv/bin/python" -m pytest -p no:cacheprovider "$@"
