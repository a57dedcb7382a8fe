#!/usr/bin/env bash
# Pull the model for the image and write the step outputs the build uses:
# version (the release, or main-<sha>), md5 of the model, and the image tags. The image is the
# Dockerfile's default variant: models/model.onnx (the export stage's output) on ONNX Runtime.
#   GITHUB_REF, GITHUB_SHA, GITHUB_REPOSITORY, GITHUB_OUTPUT from Actions; DOCKERHUB_REPO optional
set -euo pipefail
cd "$(dirname "$0")/../.."
python3 -m pip install --quiet "dvc[s3]"
dvc pull models/model.onnx
case "${GITHUB_REF:-}" in
    refs/tags/traffic-sign-net@v*) version=${GITHUB_REF#refs/tags/traffic-sign-net@} ;;
    *) version="main-${GITHUB_SHA:0:12}" ;;
esac
md5=$(md5sum models/model.onnx | cut -d' ' -f1)
image="ghcr.io/$(echo "${GITHUB_REPOSITORY:?}" | tr '[:upper:]' '[:lower:]')"
tags="$image:${GITHUB_SHA:0:12},$image:$version"
if [ -n "${DOCKERHUB_REPO:-}" ]; then
    tags="$tags,$DOCKERHUB_REPO:${GITHUB_SHA:0:12},$DOCKERHUB_REPO:$version"
fi
{
    echo "version=$version"
    echo "md5=$md5"
    echo "tags=$tags"
} >> "${GITHUB_OUTPUT:-/dev/stdout}"
