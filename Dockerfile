# ddn on a CUDA PyTorch base image: docker build -t ddn . && docker run --gpus all -it --rm -v $PWD:/ddn ddn
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    DDN_CACHE_DIR=/cache

WORKDIR /ddn
COPY requirements.txt /tmp/requirements.txt
# torch is already in the image; the rest comes from requirements.txt.
RUN grep -v '^torch' /tmp/requirements.txt > /tmp/req-notorch.txt && \
    pip install --no-cache-dir -r /tmp/req-notorch.txt && \
    mkdir -p /cache
COPY . /ddn
CMD ["bash"]
