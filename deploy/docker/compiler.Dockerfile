# loraflow compiler: the gRPC API and the job worker (one image; the command picks api, worker or all).
# Build from the repository root:  docker build -f deploy/docker/compiler.Dockerfile -t loraflow-compiler .
# BASE_IMAGE: any Debian-based Python 3.11 with `python` and `pip` on PATH (the compose test builds one
# locally with debootstrap where no registry is reachable).
# The LoraRows kernel (loraflow/native), built in a stage of its own so g++ and the headers stay out of the
# image; for x86-64-v2, not this builder's CPU, since the image runs elsewhere. Where it cannot be built
# (another architecture, no Debian mirror) /out stays empty and the image runs the standard-operator graph.
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE} AS native
RUN mkdir -p /out && { apt-get update && apt-get install -y --no-install-recommends g++ curl \
        || echo "no compiler for loraflow/native: the image serves the standard-operator graph" >&2; }
COPY loraflow/native /src/loraflow/native
RUN NATIVE_MARCH=x86-64-v2 ORT_HEADERS_DIR=/tmp/ort-headers /src/loraflow/native/build.sh \
    && { cp /src/loraflow/native/liblora_rows.so /out/ 2>/dev/null || true; }

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
RUN touch README.md && pip install -c requirements.lock '.[compiler]' && pip uninstall -y loraflow
COPY README.md ./
COPY loraflow ./loraflow
COPY services ./services
RUN pip install --no-deps .
COPY --from=native /out/ /opt/loraflow-native/
ENV LORAFLOW_NATIVE_LIBRARY=/opt/loraflow-native/liblora_rows.so

# A numeric USER (uid and gid 10001), so Kubernetes can verify runAsNonRoot.
RUN groupadd --gid 10001 loraflow \
    && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/loraflow loraflow \
    && mkdir -p /var/cache/loraflow \
    && chown -R loraflow:loraflow /var/cache/loraflow
USER 10001:10001

EXPOSE 50052
ENTRYPOINT ["python", "-m", "services.compiler"]
CMD ["all", "--listen", "0.0.0.0:50052"]
