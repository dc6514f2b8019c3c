#!/usr/bin/env bash
# Installs the system packages ferry needs to build, test and run its demo. Idempotent: packages
# already installed are skipped, and nothing is asked. Runs as root (or with sudo) without a
# terminal.
set -euo pipefail

packages=(
  build-essential pkg-config    # cc for the -sys crates
  clang libclang-dev            # bindgen for RocksDB's bindings
  protobuf-compiler libprotobuf-dev  # etcd-client's gRPC code generation (protoc + the well-known .proto files)
  etcd-server etcd-client       # etcd and etcdctl: cluster metadata and elections
  redis-tools                   # redis-cli and redis-benchmark: the demo's load and checks
  redis-server                  # the baseline `bench` compares the node with
  iproute2 procps               # ip netns, tc, sysctl: the WAN tests and the link emulator
  iperf3 rsync openssh-server openssh-client  # TCP baselines the bench measures over the link emulator
  prometheus                    # promtool: the suite checks and unit-tests deploy/prometheus's alert rules
  curl ca-certificates
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done

if ((${#missing[@]})); then
  sudo=""
  if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
  echo "setup: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq
  # policy-rc.d keeps package scripts from starting system services (etcd, redis) that would
  # take the default ports; ferry starts its own on free ports.
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' | $sudo tee /usr/sbin/policy-rc.d >/dev/null
    $sudo chmod +x /usr/sbin/policy-rc.d
    trap '$sudo rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "setup: cargo is not on PATH; install Rust (rustup) first, then run this again" >&2
  exit 1
fi
