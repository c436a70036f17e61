# ddn on CUDA: docker build -t ddn . && docker run --gpus all -it --rm -v $PWD:/ddn ddn
# torch is pinned to the version CI tests (.ci/run; tests/test_docker.py keeps the two equal).
# PyPI's Linux wheel of torch brings its own CUDA runtime, cuDNN and NCCL, so the base image only
# needs Python; the host needs the NVIDIA container toolkit and a driver recent enough for the
# CUDA of that wheel (`python -c "import torch; print(torch.version.cuda)"` inside the image).
FROM python:3.11-slim

ARG TORCH_VERSION=2.13.0

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    DDN_CACHE_DIR=/cache

# A C compiler: torch.compile (train.py --compile) builds small launcher modules with it.
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev && \
    rm -rf /var/lib/apt/lists/*

WORKDIR /ddn
COPY requirements.txt /tmp/requirements.txt
RUN pip install --no-cache-dir torch==${TORCH_VERSION} && \
    pip install --no-cache-dir -r /tmp/requirements.txt && \
    mkdir -p /cache
COPY . /ddn
CMD ["bash"]
