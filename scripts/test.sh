#!/usr/bin/env bash
# The whole test suite: installs what is missing, builds every binary, runs every test.
# Everything uses the release profile, so RocksDB's C++ is compiled once for both.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release --workspace --bins
cargo test --release --workspace "$@"
