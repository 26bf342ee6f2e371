#!/bin/bash
# Copy the thirty-first pass's small outputs here (tags: i2d dft vs4). Usage: bash collect.sh WORK [WORK ...]
here=$(cd "$(dirname "$0")" && pwd)
exec bash "$here/../collect.sh" "$here" "i2d dft vs4" "$@"
