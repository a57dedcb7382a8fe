#!/usr/bin/env bash
# Run one pipeline stage (and whatever upstream is stale) the way CI does, locally or inside a
# backend container:  .ci/gha/stage.sh STAGE
#   DVC_PULL=1  restore unchanged upstream stages from the remote instead of running them
#   DVC_PUSH=1  push outputs and the run-cache afterwards (needs remote credentials)
set -euo pipefail
stage=${1:?usage: stage.sh STAGE}
cd "$(dirname "$0")/../.."

# The checkout belongs to another user inside a job container.
git config --global --add safe.directory "$PWD"

if ! command -v gtsrb >/dev/null 2>&1; then
    # Keep the image's torch and numpy (torch 2.3 in the Arm images is built against numpy 1.x):
    # no lock file here, and nothing upgraded that already satisfies pyproject.toml.
    python3 -m pip install --quiet --upgrade-strategy only-if-needed -e '.[pipeline]'
fi

pull=()
if [ "${DVC_PULL:-0}" = 1 ]; then pull=(--pull); fi
dvc repro "${pull[@]}" "$stage"

if [ "${DVC_PUSH:-0}" = 1 ]; then
    dvc push --run-cache
fi
