#!/usr/bin/env bash
# Set up nnssl_joint from nothing: a virtual environment, PyTorch (only when missing), the package.
#
#   NNSSL_VENV          where the virtual environment lives (default: .venv in the repository)
#   NNSSL_TORCH_SPEC    what pip installs when torch is missing; default is a CPU-capable matching
#                       pair. GPU users: e.g. NNSSL_TORCH_SPEC="torch torchvision --index-url ..."
#                       torch and torchvision must match: nnU-Net's trainer lookup imports timm, which
#                       imports torchvision, and a mismatched pair breaks every `nnUNetv2_train -tr`.
#   NNSSL_EXTRAS        pip extras to install (default: test)
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${NNSSL_VENV:-$repo/.venv}"
torch_spec="${NNSSL_TORCH_SPEC:-torch==2.14.1 torchvision==0.29.1}"
extras="${NNSSL_EXTRAS:-test}"
python="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
    echo "[setup] creating virtual environment $venv"
    "$python" -m venv "$venv"
fi
py="$venv/bin/python"

if ! "$py" -c "import torch, torchvision" >/dev/null 2>&1; then
    echo "[setup] installing PyTorch: $torch_spec"
    # The default pair is a CUDA build from PyPI: about 5.6 GB once installed. pip stops half-way with
    # "[Errno 28] No space left on device" when the disk is short, so say so before it starts.
    free_kb="$(df -Pk "$(dirname "$venv")" | awk 'NR == 2 {print $4}')"
    if [ -n "$free_kb" ] && [ "$free_kb" -lt 7000000 ]; then
        echo "[setup] WARNING: $((free_kb / 1024)) MB free under $(dirname "$venv"); PyTorch needs about" \
             "6 GB. Free some space, or set NNSSL_VENV to a folder on a larger disk." >&2
    fi
    # shellcheck disable=SC2086
    "$py" -m pip install --disable-pip-version-check --no-cache-dir $torch_spec
else
    echo "[setup] PyTorch present: $("$py" -c 'import torch, torchvision; print(torch.__version__, torchvision.__version__)')"
fi

if ! "$py" -c "import nnssl_joint, nnunetv2" >/dev/null 2>&1 || [ "${NNSSL_REINSTALL:-0}" = 1 ] \
    || [ "$repo/pyproject.toml" -nt "$venv/.nnssl_joint_installed" ]; then
    echo "[setup] installing nnssl_joint[$extras] (editable) and its dependencies"
    "$py" -m pip install --disable-pip-version-check -q -e "$repo[$extras]"
    touch "$venv/.nnssl_joint_installed"
fi
echo "[setup] ready: $venv"
