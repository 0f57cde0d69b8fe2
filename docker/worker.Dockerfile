# A job worker (one per GPU) on a CUDA PyTorch base image. Build from the repository root:
#   docker build -f docker/worker.Dockerfile -t restorelcc-worker .
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 TOKENIZERS_PARALLELISM=false
WORKDIR /srv
RUN useradd --create-home --uid 10001 restorelcc

COPY pyproject.toml README.md ./
COPY app ./app
COPY worker ./worker
# torch comes with the base image; pip keeps it when it satisfies the worker's range.
RUN pip install ".[worker]"

USER restorelcc
ENV RESTORELCC_DATA_DIR=/home/restorelcc/data HF_HOME=/home/restorelcc/hf
CMD ["restorelcc", "worker", "--concurrency", "1"]
