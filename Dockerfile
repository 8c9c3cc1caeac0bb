# tether-ensemble: one image for the Ray head and the Ray GPU workers
# (docker-compose.yml, deploy/kuberay/raycluster.yaml).
#
#   GPU image (default):  docker build -t tether-ensemble:0.1.0 .
#   CPU-only image:       docker build --build-arg TORCH_VARIANT=cpu -t tether-ensemble:0.1.0-cpu .
#
# No secrets are baked in: Ray's auth token (RAY_AUTH_TOKEN) is given at run time.
FROM python:3.11-slim

# Which torch 2.13.0 build to install, as a PyTorch wheel index variant: a CUDA variant such
# as cu128 for GPU workers, or cpu. The variant must be one that the PyTorch index offers
# for torch 2.13.0 and that the hosts' NVIDIA driver supports; cu128 was not checked
# against the index when this file was written (the index was unreachable).
ARG TORCH_VARIANT=cu128
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/${TORCH_VARIANT}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# wget: KubeRay's default readiness/liveness probes run `wget` inside the Ray container.
RUN apt-get update \
    && apt-get install -y --no-install-recommends wget \
    && rm -rf /var/lib/apt/lists/*

# The unprivileged user everything runs as (uid/gid 1000, matched by the KubeRay manifest).
RUN groupadd --gid 1000 ray \
    && useradd --uid 1000 --gid 1000 --create-home --shell /bin/bash ray

# torch first, from the PyTorch index, so the build variant is ours to choose. pyproject.toml
# pins torch==2.13.0; a local version such as 2.13.0+cu128 satisfies that pin, so the
# `pip install .` below keeps this build instead of fetching another one.
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==2.13.0"

WORKDIR /app
COPY pyproject.toml README.md ./
COPY ensemble ./ensemble
COPY configs ./configs
RUN pip install . \
    && python -c "import torch; v = torch.__version__; assert v.split('+')[0] == '2.13.0', v" \
    && rm -rf build *.egg-info

# /runs holds the run directories; compose mounts a named volume there and KubeRay a PVC.
# A new named volume takes this directory's owner (uid 1000). /app/runs points at it, so
# `ensemble run` without --run-dir (runs/<job>, relative to /app) also lands on the volume.
RUN mkdir -p /runs \
    && chown 1000:1000 /runs \
    && ln -s /runs /app/runs

# Non-root, by uid so Kubernetes' runAsNonRoot can verify it (1000 is `ray`).
USER 1000:1000
ENV HOME=/home/ray

# Documentation only; compose and KubeRay decide what is published.
# 6379 GCS, 8265 dashboard and Jobs API, 10001 Ray client.
EXPOSE 6379 8265 10001

CMD ["ensemble", "--help"]
