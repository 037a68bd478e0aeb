#!/usr/bin/env bash
# Builds loraflow/native/liblora_rows.so (the LoraRows ONNX Runtime kernel) with the host's C++ compiler.
#
# ONNX Runtime's C API headers come from Debian's libonnxruntime-dev package (the pip wheel ships none):
# the .deb is fetched once, its sha256 checked against the pin below, and unpacked under $ORT_HEADERS_DIR.
# The kernel uses the versioned C API only (OrtApiBase::GetApi(21)), so headers of 1.21 serve the 1.32
# runtime in the venv. Without a compiler or the package the build is skipped with a message and
# everything runs on the standard-operator graph (LORAFLOW_REQUIRE_NATIVE=1 makes that an error).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="$here/liblora_rows.so"
src="$here/lora_rows.cc"
mirror="${DEBIAN_MIRROR:-https://deb.debian.org/debian}"
deb_path="pool/main/o/onnxruntime/libonnxruntime-dev_1.21.0+dfsg-1_amd64.deb"
deb_sha256="14f7d959d5deacbcf1504830d4189f91fc67382b399ed9ae9d3aa9c4050ced08"
headers="${ORT_HEADERS_DIR:-$here/../../.venv/ort-headers}"
cxx="${CXX:-g++}"

skip() {
    echo "native LoRA kernel not built: $1 (the standard-operator graph serves instead)" >&2
    if [ "${LORAFLOW_REQUIRE_NATIVE:-0}" = "1" ]; then exit 1; fi
    exit 0
}

command -v "$cxx" >/dev/null 2>&1 || skip "no C++ compiler ($cxx)"
[ "$(uname -m)" = "x86_64" ] || skip "the pinned headers package is for amd64, this is $(uname -m)"
include="$headers/usr/include/onnxruntime"
if [ ! -f "$include/onnxruntime_cxx_api.h" ]; then
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT
    echo "fetching ONNX Runtime C API headers ($deb_path)" >&2
    curl -fsSL --retry 3 "$mirror/$deb_path" -o "$tmp/ort.deb" || skip "could not download $mirror/$deb_path"
    echo "$deb_sha256  $tmp/ort.deb" | sha256sum -c --quiet - || skip "sha256 of $deb_path does not match the pin"
    mkdir -p "$headers"
    if command -v dpkg-deb >/dev/null 2>&1; then
        dpkg-deb -x "$tmp/ort.deb" "$headers"
    else  # a .deb is an ar archive holding data.tar.*
        (cd "$tmp" && ar x ort.deb && tar -xf data.tar.* -C "$headers")
    fi
fi
# -march=native: the library is built on the machine that runs it (make install), never shipped (the images
# pass NATIVE_MARCH=x86-64-v2). 256-bit vectors: with AVX-512 a B=8 decode node took 15-29 us against 10-12.
# -fno-trapping-math: nothing here reads floating-point exception flags (it let g++ 12 vectorise SwiGlu's per-float
# loop on x86-64-v2; the loop is now written on vectors, see swiglu.h); results are the same.
# -Wno-psabi: LoraRows' 8-float vectors are passed between inline helpers of internal linkage, so the note that
# such a value's calling convention differs without AVX (the x86-64-v2 build) concerns no interface.
"$cxx" -std=c++17 -O3 -march="${NATIVE_MARCH:-native}" -mprefer-vector-width=256 -fno-trapping-math -Wno-psabi -fPIC -shared \
    -fvisibility=hidden -Wall -Wextra -I"$include" "$src" -o "$out.tmp"
mv "$out.tmp" "$out"
echo "built $out" >&2
