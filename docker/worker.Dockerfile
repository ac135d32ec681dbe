# The worker image, on a CUDA runtime base: one container (one `captioner worker` process) per GPU.
# The same image runs on a CPU-only host (torch falls back to the CPU, batches of 64 in forwards of 32).
#   docker build -f docker/worker.Dockerfile -t captioner-worker .
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PATH=/venv/bin:$PATH
# exiftool: batches that ask for XMP sidecars ("write_metadata": "sidecar") are written by the worker
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv libimage-exiftool-perl \
 && rm -rf /var/lib/apt/lists/* && python3 -m venv /venv
WORKDIR /app

# dependencies first: this layer is reused while only our code changes
COPY pyproject.toml README.md ./
RUN for d in model core api worker migrations cli bench; do mkdir -p $d && touch $d/__init__.py; done \
 && pip install '.[worker]' && pip uninstall -y captioner

COPY model model
COPY core core
COPY api api
COPY worker worker
COPY migrations migrations
COPY cli cli
COPY bench bench
# the ONNX cache's folder belongs to the worker's user: a named volume mounted there starts as a copy of it
RUN pip install --no-deps . && useradd --create-home captioner \
    && mkdir -p /var/cache/captioner/onnx && chown -R captioner /var/cache/captioner
USER captioner

# one pool process: it owns the GPU (or every CPU core through torch's threads)
CMD ["captioner", "worker", "--concurrency", "1"]
