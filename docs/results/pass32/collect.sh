#!/bin/bash
# Copy the thirty-second pass (arm pn)'s small outputs here (tags: pn). Usage: bash collect.sh WORK [WORK ...]
here=$(cd "$(dirname "$0")" && pwd)
exec bash "$here/../collect.sh" "$here" "pn" "$@"
