# loraflow trainer: the gRPC API and the job worker (one image; the command picks api, worker or all).
# Build from the repository root:  docker build -f deploy/docker/trainer.Dockerfile -t loraflow-trainer .
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    LORAFLOW_CACHE_DIR=/var/cache/loraflow \
    HOME=/home/loraflow

WORKDIR /app

# torch first, by exact version, from the CPU index: the CUDA build would add gigabytes for nothing here.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

# Dependencies before sources so a code change does not reinstall them.
COPY pyproject.toml README.md requirements.lock ./
COPY loraflow ./loraflow
COPY services ./services
RUN pip install -c requirements.lock '.[trainer]'

# A numeric USER (uid and gid 10001), so Kubernetes can verify runAsNonRoot.
RUN groupadd --gid 10001 loraflow \
    && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/loraflow loraflow \
    && mkdir -p /var/cache/loraflow \
    && chown -R loraflow:loraflow /var/cache/loraflow
USER 10001:10001

EXPOSE 50051
ENTRYPOINT ["python", "-m", "services.trainer"]
CMD ["all", "--listen", "0.0.0.0:50051"]
