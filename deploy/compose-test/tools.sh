#!/usr/bin/env bash
# Makes the host ready for the compose test, installing only from package registries:
#   - Docker Engine and debootstrap from Debian's packages (apt), when missing;
#   - a dockerd, started when none answers (no default bridge and no iptables: the sandbox has neither;
#     user-defined compose networks and published ports still work);
#   - the Compose v2 plugin, unpacked from Debian trixie's docker-compose package (bookworm ships only the
#     Python 1.29, which rejects the top-level `name:`), its sha256 checked against the Packages index
#     that lists it.
# Prints `export` lines for DOCKER and COMPOSE; sourced by run.sh.
set -euo pipefail

TOOLS=${LORAFLOW_COMPOSE_TOOLS:-/var/cache/loraflow-compose-test}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
mkdir -p "$TOOLS"

if ! [ -x /usr/sbin/dockerd ] || ! [ -x /usr/bin/docker ] || ! command -v debootstrap >/dev/null; then
    echo "installing docker.io and debootstrap from Debian's packages" >&2
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends docker.io debootstrap >&2
fi
# Debian's client matches Debian's daemon and has BuildKit built in (a newer client elsewhere on PATH may
# want a buildx plugin this host does not have).
DOCKER=/usr/bin/docker

if ! "$DOCKER" info >/dev/null 2>&1; then
    echo "starting dockerd (log: $TOOLS/dockerd.log)" >&2
    nohup /usr/sbin/dockerd --bridge=none --iptables=false --ip6tables=false >"$TOOLS/dockerd.log" 2>&1 &
    for _ in $(seq 1 60); do
        "$DOCKER" info >/dev/null 2>&1 && break
        sleep 1
    done
    "$DOCKER" info >/dev/null 2>&1 || { tail -20 "$TOOLS/dockerd.log" >&2; echo "dockerd did not come up" >&2; exit 1; }
fi

COMPOSE="$TOOLS/docker-compose"
if ! [ -x "$COMPOSE" ]; then
    echo "fetching the Compose v2 plugin from Debian trixie's docker-compose package" >&2
    index=$(mktemp)
    curl -fsSL --retry 3 "$MIRROR/dists/trixie/main/binary-amd64/Packages.xz" | xz -dc >"$index"
    entry=$(awk '/^Package: docker-compose$/{p=1} p&&/^$/{exit} p' "$index")
    rm -f "$index"
    file=$(awk '/^Filename:/{print $2}' <<<"$entry")
    sum=$(awk '/^SHA256:/{print $2}' <<<"$entry")
    version=$(awk '/^Version:/{print $2}' <<<"$entry")
    case "$version" in 2.*) ;; *) echo "trixie's docker-compose is $version, not Compose v2" >&2; exit 1 ;; esac
    deb=$(mktemp --suffix=.deb)
    curl -fsSL --retry 3 -o "$deb" "$MIRROR/$file"
    echo "$sum  $deb" | sha256sum -c --quiet - >&2
    unpacked=$(mktemp -d)
    dpkg-deb -x "$deb" "$unpacked"
    install -m 0755 "$unpacked/usr/libexec/docker/cli-plugins/docker-compose" "$COMPOSE"
    rm -rf "$deb" "$unpacked"
fi
"$COMPOSE" version >&2

echo "export DOCKER=$DOCKER COMPOSE=$COMPOSE"
