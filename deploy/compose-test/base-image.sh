#!/usr/bin/env bash
# Builds the local Python base image that stands in for python:3.11-slim where no registry is reachable:
# Debian bookworm (minbase, via debootstrap) with its python3 (3.11), a venv at /opt/python on PATH
# (so `python` and `pip` mean what they mean in the official image) and this host's CA bundle (pip
# inside a build then trusts what the host trusts). Prints the image tag.
#
# The tag carries a digest of this script and of the CA bundle: an unchanged recipe is not rebuilt.
set -euo pipefail

DOCKER=${DOCKER:-docker}
SUITE=bookworm
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
CA_BUNDLE=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
PACKAGES=python3,python3-venv,ca-certificates,passwd

digest=$(cat "$0" "$CA_BUNDLE" | sha256sum | cut -c1-12)
tag="loraflow-base:${SUITE}-${digest}"
if "$DOCKER" image inspect "$tag" >/dev/null 2>&1; then
    echo "$tag"
    exit 0
fi

root=$(mktemp -d /var/tmp/loraflow-base.XXXXXX)
trap 'rm -rf "$root"' EXIT
echo "debootstrap $SUITE into $root (packages: $PACKAGES)" >&2
debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$root" "$MIRROR" >&2
cp "$CA_BUNDLE" "$root/etc/ssl/certs/ca-certificates.crt"
chroot "$root" /usr/bin/python3 -m venv /opt/python >&2
chroot "$root" /opt/python/bin/python -m pip --version >&2
# Nothing apt downloaded needs to travel in the image.
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root"/usr/share/doc/* \
       "$root"/usr/share/man/* "$root"/usr/share/locale/*

tar --numeric-owner -C "$root" -c . | "$DOCKER" import \
    --change 'ENV PATH=/opt/python/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' \
    --change 'ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt' \
    --change 'ENV REQUESTS_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt' \
    --change 'CMD ["python3"]' \
    - "$tag" >&2
"$DOCKER" tag "$tag" "loraflow-base:${SUITE}" >&2
echo "$tag"
