#!/usr/bin/env bash
# Build the PR report against the base branch and post it (or update it) on the PR.
#   BASE_REF   base branch name (github.base_ref), e.g. main
#   PR_NUMBER  pull request number; GITHUB_TOKEN and GITHUB_REPOSITORY from the workflow
set -euo pipefail
cd "$(dirname "$0")/../.."
base=${BASE_REF:-main}
git config --global --add safe.directory "$PWD"
# A shallow CI clone has no base branch: fetch just its tip.
if ! git rev-parse --verify --quiet "origin/$base" >/dev/null; then
    git fetch --quiet --depth 1 origin "$base:refs/remotes/origin/$base"
fi
gtsrb ci-report --base "origin/$base" --head-label "${HEAD_LABEL:-this PR}" --out "${REPORT:-report.md}"
gtsrb ci-comment --file "${REPORT:-report.md}" --pr "${PR_NUMBER:-}"
