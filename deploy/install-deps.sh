#!/usr/bin/env bash
# Installs the Debian 12 packages that building and testing mmdit-serve need.
# Usage: deploy/install-deps.sh [--runtime]   (--runtime: only what the server needs to run)
set -euo pipefail
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
runtime_pkgs=(libgrpc++1.51 libprotobuf32 libabsl20220623 libopenblas0-pthread)
build_pkgs=(
  build-essential cmake ninja-build pkg-config git
  libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler
  libabsl-dev nlohmann-json3-dev libopenblas-dev
  libgtest-dev libgmock-dev
  prometheus   # promtool and a real Prometheus for the metrics tests
  python3 python3-numpy python3-grpcio python3-grpc-tools python3-protobuf
)
pkgs=("${build_pkgs[@]}")
if [ "${1:-}" = "--runtime" ]; then pkgs=("${runtime_pkgs[@]}"); fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${pkgs[@]}"
