#!/usr/bin/env bash
# make test-compose: builds the images and runs deploy/compose-test/test_compose.py against the compose stack
# (the README quickstart verbatim, a mixed batch equal to PEFT, a killed worker, a Redis crash), and tears
# everything down, on failure too. Needs root (it may install Docker and start dockerd) and .venv.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
started=$(date +%s)

eval "$(deploy/compose-test/tools.sh)"     # DOCKER, COMPOSE
TOOLS=$(dirname "$COMPOSE")
export DOCKER
# The Compose plugin for whichever docker client the README's `docker compose` finds first on PATH.
export DOCKER_CONFIG="$TOOLS/docker-config"
mkdir -p "$DOCKER_CONFIG/cli-plugins"
ln -sf "$COMPOSE" "$DOCKER_CONFIG/cli-plugins/docker-compose"
# Debian's client first: it matches the daemon and builds with BuildKit without a buildx plugin.
export PATH="$TOOLS/bin:$PATH"
mkdir -p "$TOOLS/bin"
ln -sf "$DOCKER" "$TOOLS/bin/docker"

LORAFLOW_BASE_IMAGE=$(DOCKER=$DOCKER deploy/compose-test/base-image.sh)
export LORAFLOW_BASE_IMAGE

# torch for the trainer and compiler images: this host's CPU wheel (pip finds it on local disk), served on
# loopback to builds that run with --network host; without one, the images take the public CPU index.
wheels="$TOOLS/wheels"
mkdir -p "$wheels"
if .venv/bin/pip download -q --no-deps --dest "$wheels" 'torch==2.13.0+cpu' 2>/dev/null; then
    port=$(.venv/bin/python -c 'from loraflow.jobs.embedded_redis import free_port; print(free_port())')
    .venv/bin/python -m http.server --bind 127.0.0.1 --directory "$wheels" "$port" >/dev/null 2>&1 &
    wheel_server=$!
    export LORAFLOW_TORCH_FIND_LINKS="http://127.0.0.1:$port/" LORAFLOW_TORCH_INDEX_URL=https://pypi.org/simple
fi

export COMPOSE_PROJECT_NAME=loraflow-compose-test
LORAFLOW_COMPOSE_WORKDIR=$(mktemp -d /var/tmp/loraflow-compose-test.XXXXXX)
export LORAFLOW_COMPOSE_WORKDIR

teardown() {
    status=$?
    if [ -f "$LORAFLOW_COMPOSE_WORKDIR/deploy/docker-compose.yml" ]; then
        (cd "$LORAFLOW_COMPOSE_WORKDIR" && \
         COMPOSE_FILE=deploy/docker-compose.yml:deploy/compose-test/docker-compose.test.yml \
         "$DOCKER" compose down -v --remove-orphans --timeout 30 >/dev/null 2>&1) || true
    fi
    [ -n "${wheel_server:-}" ] && kill "$wheel_server" 2>/dev/null || true
    rm -rf "$LORAFLOW_COMPOSE_WORKDIR"
    echo "test-compose: $(( $(date +%s) - started )) s, exit $status" >&2
    exit $status
}
trap teardown EXIT INT TERM

.venv/bin/python -m pytest -q -p no:cacheprovider -ra -s deploy/compose-test/test_compose.py "$@"
