# Stand-in for redis:7.4-alpine where no registry is reachable: Debian's redis-server (7.0) on the local
# base image. Same entry point, working directory and user as the official image, so the compose
# file's command, volume and healthcheck apply unchanged.
ARG BASE_IMAGE=loraflow-base:bookworm
FROM ${BASE_IMAGE}
RUN apt-get update -qq \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends redis-server \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /data && chown redis:redis /data
WORKDIR /data
USER redis
EXPOSE 6379
CMD ["redis-server"]
