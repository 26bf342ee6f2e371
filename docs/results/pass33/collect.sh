#!/bin/bash
# Copy the thirty-third pass (arm mstd)'s small outputs here: each probe.json (per weights, or 2D-only with the random
# initialisations) and each harness read-out (<tag>_s<seed>.json). Usage: bash collect.sh WORK [WORK ...]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
for work in "$@"; do
  for probe in "$work"/probeN_*/probe.json; do
    if [ -f "$probe" ]; then cp "$probe" "$here/$(basename "$(dirname "$probe")").json"; fi
  done
  for readout in "$work"/mstd_s[0-9]*.json; do
    if [ -f "$readout" ]; then cp "$readout" "$here/harness_$(basename "$readout")"; fi
  done
done
ls "$here"
