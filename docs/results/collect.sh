#!/bin/bash
# Copy one pass's small outputs into its docs/results folder: each probe.json (per weights, or 2D-only with the
# random initialisations) as probeN_*.json, and each harness read-out <tag>_s<seed>.json as harness_<tag>_s<seed>.json.
# Usage: bash collect.sh DEST "TAG [TAG ...]" WORK [WORK ...]   (each pass folder's collect.sh calls this)
set -euo pipefail
dest=$1; tags=$2; shift 2
for work in "$@"; do
  for probe in "$work"/probeN_*/probe.json; do
    if [ -f "$probe" ]; then cp "$probe" "$dest/$(basename "$(dirname "$probe")").json"; fi
  done
  for tag in $tags; do
    for readout in "$work"/"$tag"_s[0-9]*.json; do
      if [ -f "$readout" ]; then cp "$readout" "$dest/harness_$(basename "$readout")"; fi
    done
  done
done
ls "$dest"
