# The HTTP API: no torch. Build from the repository root:
#   docker build -f docker/api.Dockerfile -t restorelcc-api .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /srv
RUN useradd --create-home --uid 10001 restorelcc

COPY pyproject.toml README.md ./
COPY app ./app
COPY worker ./worker
RUN pip install ".[api]" && python -c "import app.main, sys; assert 'torch' not in sys.modules"

RUN mkdir -p /home/restorelcc/data && chown -R restorelcc:restorelcc /home/restorelcc
USER restorelcc
ENV RESTORELCC_HOST=0.0.0.0 RESTORELCC_PORT=8000 RESTORELCC_DATA_DIR=/home/restorelcc/data
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz')"
CMD ["restorelcc", "serve"]
