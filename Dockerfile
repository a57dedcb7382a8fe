# The gtsrb prediction server: `gtsrb serve` (FastAPI + uvicorn) on port 8000 with one model
# baked in. Needs BuildKit (the default since Docker 23; DOCKER_BUILDKIT=1 with Docker 20.10).
# Deliberately no `# syntax=` line: it would make BuildKit fetch a frontend from Docker Hub.
#
# Two variants from this one file, chosen by the build arg RUNTIME:
#
#   onnxruntime (the default): models/model.onnx, the ONNX export, on ONNX Runtime. No torch in
#       the image: numpy, pillow, onnx, onnxruntime and the HTTP stack (`gtsrb[serve]`).
#   torch: models/model.pt on PyTorch (`gtsrb[serve,torch]`, `--runtime torch --inference jit`),
#       with torch from a wheel in the context's wheels/ folder (TORCH_WHEEL) or from an index
#       (TORCH, TORCH_PIP_ARGS: PyTorch's CPU index by default, on every architecture).
#
# Build on the machines of this project (no image registry; base made by .ci/provision-docker):
#
#   DOCKER_BUILDKIT=1 /usr/bin/docker build -t gtsrb-serve \
#       --build-arg MODEL_MD5=$(md5sum < models/model.onnx | cut -c1-32) \
#       --build-arg MODEL_VERSION=v1.0.0 --build-arg GIT_REVISION=$(git rev-parse HEAD) .
#
#   # the torch variant, CPU torch from the local wheel copied into the context's wheels/:
#   mkdir -p wheels && pip download torch==2.13.0 --no-deps -d wheels
#   DOCKER_BUILDKIT=1 /usr/bin/docker build -t gtsrb-serve:torch --build-arg RUNTIME=torch \
#       --build-arg TORCH_WHEEL=wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl \
#       --build-arg MODEL_MD5=$(md5sum < models/model.pt | cut -c1-32) ... .
#
# Elsewhere, on any Docker with a registry, pass a stock Python base:
#
#   docker buildx build --platform linux/amd64,linux/arm64 --build-arg BASE=python:3.11-slim-bookworm \
#       -t REGISTRY/gtsrb-serve --push .
#   docker buildx build --platform linux/arm64 --build-arg BASE=python:3.11-slim-bookworm \
#       --build-arg RUNTIME=torch --build-arg TORCH=torch==2.13.0 -t gtsrb-serve:torch .
#
# The torch variant takes torch alone from PyTorch's CPU index (TORCH_PIP_ARGS), the rest from
# PyPI: PyPI's torch is a CUDA build on linux/amd64 and, in recent releases, on linux/arm64 too
# (GBs of CUDA libraries that a CPU server cannot use). The default variant has no torch at all.
#
# Nothing here depends on the architecture. The base needs python3 (3.11+: tomllib) with venv,
# wherever it lives (/usr/bin in the debootstrap base, /usr/local/bin in python:*): every stage
# starts from the same base, so the venv's python link holds in the final stage.
# Run: docker run -p 127.0.0.1:8000:8000 gtsrb-serve  (GET /health, GET /ready, POST /predict)

ARG BASE=gtsrb-base:bookworm
ARG RUNTIME=onnxruntime

# ---------------------------------------------------------------------------------------------
FROM ${BASE} AS venv
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_DEFAULT_TIMEOUT=180 \
    PATH=/opt/venv/bin:$PATH
RUN python3 -m venv /opt/venv
WORKDIR /build

# 1. The runtime's own heavy part. onnxruntime: nothing here (ONNX Runtime comes with the rest).
FROM venv AS deps-onnxruntime

# torch alone (about 190 MB), without its dependencies: from a wheel in the context's wheels/
# folder (TORCH_WHEEL=wheels/NAME.whl) or, when TORCH_WHEEL is empty, the TORCH requirement
# from the index TORCH_PIP_ARGS names. This layer depends on nothing else in the context.
# `wheel[s]` matches nothing when the context has no wheels/ folder: BuildKit allows that.
FROM venv AS deps-torch
ARG TORCH_WHEEL=
ARG TORCH=torch
ARG TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
COPY wheel[s] /build/wheels/
RUN --mount=type=cache,target=/root/.cache/pip \
    set -eu; \
    if [ -n "$TORCH_WHEEL" ]; then \
        torch="/build/wheels/${TORCH_WHEEL##*/}"; \
        [ -f "$torch" ] || { echo "TORCH_WHEEL=$TORCH_WHEEL: no such file in the build context's wheels/ folder" >&2; exit 1; }; \
    else \
        torch="$TORCH"; \
    fi; \
    pip install --no-deps $TORCH_PIP_ARGS "$torch"; \
    rm -rf /build/wheels

# 2. The other dependencies: those of `gtsrb[serve]` (plus `torch` for that variant, whose
#    requirement the installed torch meets: pip adds torch's own dependencies), read from
#    pyproject.toml and pinned by requirements.lock, so rebuilt only when one of those two files
#    changes. An extra that names another (`gtsrb[onnx]`) is expanded here, from the same file:
#    pip would look for a project `gtsrb` on the index.
FROM deps-${RUNTIME} AS deps
ARG RUNTIME
COPY pyproject.toml requirements.lock /build/
RUN --mount=type=cache,target=/root/.cache/pip \
    set -eu; \
    extras=serve; [ "$RUNTIME" = torch ] && extras=serve,torch; \
    python3 -c 'import sys, tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]; x = p["optional-dependencies"]; \
ours = lambda r: [d for e in r[len("gtsrb["):].rstrip("]").split(",") for d in expand(x[e.strip()])] if r.startswith("gtsrb[") else [r]; \
expand = lambda reqs: [d for r in reqs for d in ours(r)]; \
print("\n".join(dict.fromkeys(expand(p["dependencies"] + [sys.argv[1]]))))' "gtsrb[$extras]" >/build/deps.txt; \
    pip install -c requirements.lock -r /build/deps.txt; \
    pip check; \
    required_by=$(pip show setuptools 2>/dev/null | sed -n 's/^Required-by: *//p'); \
    pip uninstall --yes --quiet pip $([ -n "$required_by" ] || echo setuptools); \
    rm -rf /opt/venv/lib/python3*/site-packages/onnx/backend/test
# The last three lines keep out of the image what serving never runs: pip, setuptools unless a
# dependency asks for it (torch does), 24 MB with both (the package goes in below with the pip
# of the `package` stage), and ONNX's conformance test data (17 MB of .pb files under
# onnx/backend/test, which `import onnx` never reads).

# 3. The package itself, as a wheel, in a venv holding only setuptools (the locked one, which
#    builds wheels by itself): no dependencies needed, no build isolation, no index after this.
FROM venv AS package
COPY requirements.lock /build/
RUN --mount=type=cache,target=/root/.cache/pip pip install -c requirements.lock setuptools
COPY pyproject.toml README.md /build/
COPY src/ /build/src/
RUN pip wheel --no-deps --no-build-isolation --wheel-dir /wheels .

# ---------------------------------------------------------------------------------------------
FROM ${BASE} AS server
ARG RUNTIME
RUN groupadd --gid 10001 gtsrb \
    && useradd --uid 10001 --gid 10001 --create-home --shell /usr/sbin/nologin gtsrb
# The venv is one layer that a change under src/ or a new model leaves as it is; the package
# goes in on top, non-editable, by the pip of the `package` stage (mounted, not copied: the
# image has no pip; `--python` needs pip 22.3+, as the venvs of Python 3.11 bases have): `gtsrb[serve]` (and `torch` for that variant) must be fully satisfied by
# what is installed (--no-index: nothing is fetched here).
COPY --from=deps /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN --mount=type=bind,from=package,source=/wheels,target=/tmp/wheels \
    --mount=type=bind,from=package,source=/opt/venv,target=/tmp/pip \
    set -eu; \
    extras=serve; [ "$RUNTIME" = torch ] && extras=serve,torch; \
    pip="/tmp/pip/bin/python -m pip --python /opt/venv/bin/python --disable-pip-version-check"; \
    $pip install --no-index --no-cache-dir "$(ls /tmp/wheels/gtsrb-*.whl)[$extras]"; \
    $pip check; \
    gtsrb serve --help >/dev/null

# The model is part of the image: MODEL is its path in the build context.
FROM server AS server-onnxruntime
ARG MODEL=models/model.onnx
COPY ${MODEL} /app/model.onnx
ENV GTSRB_MODEL=/app/model.onnx
CMD ["gtsrb", "serve", "--host", "0.0.0.0", "--port", "8000"]

# No C++ compiler in this image (it would add ~150 MB), so no torch.compile: the frozen
# TorchScript graph runs, as fast at batch 1 and within ~15% at batch 64 (README, Benchmarks).
FROM server AS server-torch
ARG MODEL=models/model.pt
COPY ${MODEL} /app/model.pt
ENV GTSRB_MODEL=/app/model.pt
CMD ["gtsrb", "serve", "--host", "0.0.0.0", "--port", "8000", "--runtime", "torch", "--inference", "jit"]

# ---------------------------------------------------------------------------------------------
FROM server-${RUNTIME}
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /app
USER 10001:10001
EXPOSE 8000
# No curl in the image: Python asks /health (liveness; /ready says whether the model is warm).
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4).status != 200)"]

# Metadata last: a new model version or revision rebuilds nothing above. The server reports
# MODEL_VERSION as `model_version` (empty: the model file's md5).
ARG BASE
ARG RUNTIME
ARG MODEL_VERSION=
ARG GIT_REVISION=unknown
ARG MODEL_MD5=unknown
ENV GTSRB_MODEL_VERSION=${MODEL_VERSION}
LABEL org.opencontainers.image.title="gtsrb-serve" \
      org.opencontainers.image.description="GTSRB traffic-sign classifier: HTTP prediction server (gtsrb serve)" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${MODEL_VERSION}" \
      org.opencontainers.image.revision="${GIT_REVISION}" \
      org.opencontainers.image.base.name="${BASE}" \
      gtsrb.runtime="${RUNTIME}" \
      gtsrb.model.version="${MODEL_VERSION}" \
      gtsrb.model.md5="${MODEL_MD5}" \
      gtsrb.git.revision="${GIT_REVISION}"
