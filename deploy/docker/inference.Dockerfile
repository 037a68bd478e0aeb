# loraflow inference: ONNX Runtime + tokenizers, no torch (the artifacts are compiled elsewhere).
# Build from the repository root:  docker build -f deploy/docker/inference.Dockerfile -t loraflow-inference .
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    LORAFLOW_CACHE_DIR=/var/cache/loraflow \
    HOME=/home/loraflow

WORKDIR /app

COPY pyproject.toml README.md requirements.lock ./
COPY loraflow ./loraflow
COPY services ./services
# Only the inference extra: the lock pins versions, and nothing here pulls in torch.
RUN pip install -c requirements.lock '.[inference]' \
    && ! python -c "import torch" 2>/dev/null

RUN useradd --uid 10001 --create-home --home-dir /home/loraflow loraflow \
    && mkdir -p /var/cache/loraflow \
    && chown -R loraflow:loraflow /var/cache/loraflow
USER loraflow

EXPOSE 50053
ENTRYPOINT ["python", "-m", "services.inference"]
CMD ["all", "--listen", "0.0.0.0:50053"]
