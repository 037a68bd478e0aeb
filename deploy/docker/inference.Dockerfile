# loraflow inference: ONNX Runtime + tokenizers, no torch (the artifacts are compiled elsewhere).
# Build from the repository root:  docker build -f deploy/docker/inference.Dockerfile -t loraflow-inference .
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

# Only the inference extra: the lock pins versions, and nothing here pulls in torch. Dependencies before
# sources (from the metadata alone, an empty package), so a code or README change does not reinstall them.
COPY pyproject.toml requirements.lock ./
RUN touch README.md && pip install -c requirements.lock '.[inference]' && pip uninstall -y loraflow \
    && ! python -c "import torch" 2>/dev/null
# The GPU image (deploy/k8s/overlays/gpu): --build-arg ONNXRUNTIME="onnxruntime-gpu[cuda,cudnn]==1.31.1"
# swaps in onnxruntime-gpu with the CUDA/cuDNN libraries from their wheels (the node supplies the driver),
# registered with the dynamic loader so the CUDA execution provider finds them.
ARG ONNXRUNTIME=onnxruntime
RUN if [ "$ONNXRUNTIME" != onnxruntime ]; then \
        pip uninstall -y onnxruntime && pip install "$ONNXRUNTIME" \
        && python -c "import onnxruntime as o, sys; sys.exit('CUDAExecutionProvider' not in o.get_available_providers())" \
        && find "$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" -path '*/site-packages/nvidia/*' -name 'lib*.so*' -printf '%h\n' | sort -u \
           > /etc/ld.so.conf.d/nvidia-wheels.conf && ldconfig; \
    fi

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

EXPOSE 50053
ENTRYPOINT ["python", "-m", "services.inference"]
CMD ["all", "--listen", "0.0.0.0:50053"]
