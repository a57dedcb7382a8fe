#!/usr/bin/env bash
# On the runner itself: run test-openblas in the OpenBLAS image, then test-acl, export,
# test-onnxruntime and compare in the oneDNN+ACL image, one after the other on this machine (so
# compare measures runtimes, not machines), then build the PR report and post it.
#   OPENBLAS_IMAGE, ACL_IMAGE  backend images;  DVC_PULL, DVC_PUSH  see stage.sh
#   GITHUB_TOKEN, PR_NUMBER, BASE_REF  for the report (no token: job summary only)
set -euo pipefail
cd "$(dirname "$0")/../.."
workspace=$PWD

in_image() { # IMAGE SCRIPT [ARGS...]: run a repo script in a backend container on this checkout
    local image=$1
    shift
    docker run --rm --user root -v "$workspace:/work" -w /work \
        -e DVC_NO_ANALYTICS=1 -e DVC_PULL -e DVC_PUSH \
        -e AWS_ACCESS_KEY_ID -e AWS_SECRET_ACCESS_KEY -e AWS_SESSION_TOKEN -e AWS_REGION -e AWS_DEFAULT_REGION \
        -e GITHUB_TOKEN -e GITHUB_REPOSITORY -e GITHUB_API_URL -e PR_NUMBER -e BASE_REF \
        "$image" bash "$@"
}

in_image "${OPENBLAS_IMAGE:?}" .ci/gha/stage.sh test-openblas
in_image "${ACL_IMAGE:?}" .ci/gha/stage.sh test-acl
# ONNX Runtime in the ACL image too (pip adds it beside the image's torch): export, then its test
in_image "$ACL_IMAGE" .ci/gha/stage.sh test-onnxruntime
in_image "$ACL_IMAGE" .ci/gha/stage.sh compare
in_image "$ACL_IMAGE" .ci/gha/report.sh
