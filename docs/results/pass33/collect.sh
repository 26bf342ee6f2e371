#!/bin/bash
# Copy the thirty-third pass (arm mstd)'s small outputs here (tags: mstd). Usage: bash collect.sh WORK [WORK ...]
here=$(cd "$(dirname "$0")" && pwd)
exec bash "$here/../collect.sh" "$here" "mstd" "$@"
