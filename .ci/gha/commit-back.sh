#!/usr/bin/env bash
# Commit the run's dvc.lock and cache: false outputs back to the PR branch, so that `dvc pull`
# at the merged commit gets exactly the model measured there. Pushing with GITHUB_TOKEN does not
# trigger another workflow run (GitHub's rule), and the message says [skip ci] as well.
#   HEAD_REF  the PR branch (github.head_ref)
set -euo pipefail
cd "$(dirname "$0")/../.."
branch=${HEAD_REF:?HEAD_REF must name the branch to push to}
git config --global --add safe.directory "$PWD"
git config user.name "github-actions[bot]"
git config user.email "41898282+github-actions[bot]@users.noreply.github.com"
git add dvc.lock metrics reports
if git diff --cached --quiet; then
    echo "dvc.lock and metrics unchanged: nothing to commit"
    exit 0
fi
git commit --quiet -m "ci: dvc.lock and metrics of $(git rev-parse --short HEAD) [skip ci]"
# The checkout keeps no credentials (persist-credentials: false): give the token to this push only.
auth=$(printf 'x-access-token:%s' "${GITHUB_TOKEN:?}" | base64 -w0)
git -c http.extraheader="AUTHORIZATION: basic $auth" push --quiet origin "HEAD:refs/heads/$branch"
