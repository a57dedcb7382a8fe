# The gtsrb prediction server: `gtsrb serve` (FastAPI + uvicorn) on port 8000 with one model
# baked in. Needs BuildKit (the default since Docker 23; DOCKER_BUILDKIT=1 with Docker 20.10).
# Deliberately no `# syntax=` line: it would make BuildKit fetch a frontend from Docker Hub.
#
# Build on the machines of this project (no image registry; base made by .ci/provision-docker,
# CPU torch from the local wheel, copied into the context's wheels/ folder):
#
#   mkdir -p wheels && pip download torch==2.13.0 --no-deps -d wheels
#   DOCKER_BUILDKIT=1 /usr/bin/docker build -t gtsrb-serve \
#       --build-arg TORCH_WHEEL=wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl \
#       --build-arg MODEL=models/model.pt --build-arg MODEL_MD5=$(md5sum < models/model.pt | cut -c1-32) \
#       --build-arg MODEL_VERSION=v1.0.0 --build-arg GIT_REVISION=$(git rev-parse HEAD) .
#
# Elsewhere, on any Docker with a registry: pass a stock Python base and leave TORCH_WHEEL
# empty, so torch comes from the index (TORCH, default `torch`, e.g. TORCH=torch==2.13.0).
# On linux/arm64 PyPI's torch is the CPU build (oneDNN + ACL); on linux/amd64 PyPI's default
# torch is the CUDA build (GBs). PyTorch's CPU index serves both architectures, so one
# multi-platform build takes it for torch (only torch: the rest comes from PyPI):
#
#   docker buildx build --platform linux/arm64 --build-arg BASE=python:3.11-slim-bookworm -t gtsrb-serve .
#   docker buildx build --platform linux/amd64,linux/arm64 --build-arg BASE=python:3.11-slim-bookworm \
#       --build-arg "TORCH_PIP_ARGS=--index-url https://download.pytorch.org/whl/cpu" -t REGISTRY/gtsrb-serve --push .
#
# Nothing here depends on the architecture. The base needs python3 (3.11+: tomllib) with venv,
# wherever it lives (/usr/bin in the debootstrap base, /usr/local/bin in python:*): every stage
# starts from the same base, so the venv's python link holds in the runtime stage.
# Run: docker run -p 127.0.0.1:8000:8000 gtsrb-serve  (GET /health, GET /ready, POST /predict)

ARG BASE=gtsrb-base:bookworm

# ---------------------------------------------------------------------------------------------
FROM ${BASE} AS deps
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_DEFAULT_TIMEOUT=180 \
    PATH=/opt/venv/bin:$PATH
RUN python3 -m venv /opt/venv
WORKDIR /build

# 1. torch alone (about 190 MB), without its dependencies: from a wheel in the context's
#    wheels/ folder (TORCH_WHEEL=wheels/NAME.whl) or, when TORCH_WHEEL is empty, the TORCH
#    requirement from the index. This layer depends on nothing else in the context.
#    `wheel[s]` matches nothing when the context has no wheels/ folder: BuildKit allows that.
ARG TORCH_WHEEL=
ARG TORCH=torch
ARG TORCH_PIP_ARGS=
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

# 2. The other dependencies of `gtsrb[serve]` and torch's own, read from pyproject.toml and
#    pinned by requirements.lock: rebuilt only when one of those two files changes.
COPY pyproject.toml requirements.lock /build/
RUN --mount=type=cache,target=/root/.cache/pip \
    python3 -c 'import tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]; print("\n".join(p["dependencies"] + p["optional-dependencies"]["serve"]))' >/build/deps.txt \
    && pip install -c requirements.lock -r /build/deps.txt 'setuptools>=64' \
    && pip check

# 3. The package itself, as a wheel: built against the installed dependencies, so no index is
#    contacted (setuptools is in the venv: no build isolation).
FROM deps AS package
COPY README.md /build/
COPY src/ /build/src/
RUN pip wheel --no-deps --no-build-isolation --wheel-dir /wheels .

# ---------------------------------------------------------------------------------------------
FROM ${BASE} AS runtime
RUN groupadd --gid 10001 gtsrb \
    && useradd --uid 10001 --gid 10001 --create-home --shell /usr/sbin/nologin gtsrb
# The venv (torch and the dependencies, about 1 GB) is one layer that a change under src/ or a
# new model leaves as it is; the package goes in on top, non-editable: `gtsrb[serve]` must be
# fully satisfied by what is installed (--no-index: nothing is fetched here).
COPY --from=deps /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN --mount=type=bind,from=package,source=/wheels,target=/tmp/wheels \
    pip install --no-index --no-cache-dir --disable-pip-version-check "$(ls /tmp/wheels/gtsrb-*.whl)[serve]" \
    && pip check --disable-pip-version-check \
    && gtsrb serve --help >/dev/null

# The model is part of the image: MODEL is its path in the build context.
ARG MODEL=models/model.pt
COPY ${MODEL} /app/model.pt
ENV GTSRB_MODEL=/app/model.pt \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /app
USER 10001:10001
EXPOSE 8000
# No curl in the image: Python asks /health (liveness; /ready says whether the model is warm).
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4).status != 200)"]

# Metadata last: a new model version or revision rebuilds nothing above. The server reports
# MODEL_VERSION as `model_version` (empty: the checkpoint's md5).
ARG BASE
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
      gtsrb.model.version="${MODEL_VERSION}" \
      gtsrb.model.md5="${MODEL_MD5}" \
      gtsrb.git.revision="${GIT_REVISION}"

# No C++ compiler in this image (it would add ~150 MB), so no torch.compile: the frozen
# TorchScript graph runs, as fast at batch 1 and within ~15% at batch 64 (README, Benchmarks).
CMD ["gtsrb", "serve", "--host", "0.0.0.0", "--port", "8000", "--inference", "jit"]
