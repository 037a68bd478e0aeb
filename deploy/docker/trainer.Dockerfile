# loraflow trainer: the gRPC API and the job worker (one image; the command picks api, worker or all).
# Build from the repository root:  docker build -f deploy/docker/trainer.Dockerfile -t loraflow-trainer .
# BASE_IMAGE: any Debian-based Python 3.11 with `python` and `pip` on PATH (the compose test builds one
# locally with debootstrap where no registry is reachable).
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    LORAFLOW_CACHE_DIR=/var/cache/loraflow \
    HOME=/home/loraflow

WORKDIR /app

# torch first, by exact version, from the CPU index: the CUDA build would add gigabytes for nothing here.
# TORCH_FIND_LINKS (a URL or path of wheels, e.g. a host directory served over --network host) is searched
# beside the index, so a machine holding the wheel builds without downloading it; `+cpu` keeps any index
# from handing over a CUDA build.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_FIND_LINKS=
RUN pip install torch==2.13.0+cpu --index-url "$TORCH_INDEX_URL" ${TORCH_FIND_LINKS:+--find-links "$TORCH_FIND_LINKS"}

# Dependencies before sources, so a code or README change does not reinstall them: the extra's
# dependencies are installed from the metadata alone (an empty package), then the sources without deps.
COPY pyproject.toml requirements.lock ./
RUN touch README.md && pip install -c requirements.lock '.[trainer]' && pip uninstall -y loraflow
COPY README.md ./
COPY loraflow ./loraflow
COPY services ./services
RUN pip install --no-deps .

# A numeric USER (uid and gid 10001), so Kubernetes can verify runAsNonRoot.
RUN groupadd --gid 10001 loraflow \
    && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/loraflow loraflow \
    && mkdir -p /var/cache/loraflow \
    && chown -R loraflow:loraflow /var/cache/loraflow
USER 10001:10001

EXPOSE 50051
ENTRYPOINT ["python", "-m", "services.trainer"]
CMD ["all", "--listen", "0.0.0.0:50051"]
