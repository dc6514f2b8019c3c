#!/usr/bin/env bash
# The whole test suite: installs what is missing, checks formatting and lints, builds every
# binary, runs every test. Everything uses the release profile, so RocksDB's C++ is compiled once
# for clippy, the build and the tests. The binaries are built with the failpoints compiled in
# (`ferry-tests/failpoints`), which the fault tests on real processes need; without a
# configured failpoint they behave as usual.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
features=(--features ferry-tests/failpoints)
cargo fmt --all --check
cargo clippy --release --workspace --all-targets "${features[@]}" -- -D warnings
cargo build --release --workspace --bins "${features[@]}"
cargo test --release --workspace "${features[@]}" "$@"
