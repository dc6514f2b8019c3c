#!/usr/bin/env bash
# Runs ferry's fuzz targets one after the other, each for a fixed time, and prints libFuzzer's
# final stats for each. See README.md.
#
#   fuzz/run.sh [SECONDS] [TARGET...]     SECONDS per target (default 60); all targets by default
#
# Environment: FUZZ_ARGS adds libFuzzer options (e.g. FUZZ_ARGS='-max_len=65536').
# Exit status: 0 when every target built and ran its time without a crash, 1 otherwise.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"

seconds="${1:-60}"
shift || true
all_targets=(frame_decode plog_record plog_reader resp_codec)
if [ "$#" -gt 0 ]; then targets=("$@"); else targets=("${all_targets[@]}"); fi

# The crate feature each target needs (see Cargo.toml); each is built with only that.
feature_of() {
    case "$1" in
        plog_reader) echo log ;;
        resp_codec) echo resp ;;
        *) echo "" ;;
    esac
}

# cargo-fuzz passes nightly-only flags (-Zsanitizer=address); the machine has a stable toolchain.
export RUSTC_BOOTSTRAP=1
# A lean build: the machine's cores are shared.
export CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-2}"
# The fuzz crate is its own workspace; keep its build under fuzz/target whatever the caller set.
export CARGO_TARGET_DIR="$here/target"

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "== installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi

logs="$here/target/fuzz-logs"
mkdir -p "$logs"
# Release build with debug assertions and overflow checks, AddressSanitizer.
build_flags=(-O -a --no-default-features)
read -r -a extra <<<"${FUZZ_ARGS:-}"

declare -A result
failed=0
for t in "${targets[@]}"; do
    feature="$(feature_of "$t")"
    flags=("${build_flags[@]}")
    if [ -n "$feature" ]; then flags+=(--features "$feature"); fi
    rm -f "$logs/$t.log" "$logs/$t.build.log"
    echo "== $t: building"
    if ! cargo fuzz build "${flags[@]}" "$t" >"$logs/$t.build.log" 2>&1; then
        echo "!! $t does not build; the first errors ($logs/$t.build.log):"
        grep -E -A10 '^error' "$logs/$t.build.log" \
            | grep -v -E '^(Error: failed to build|Stack backtrace|warning: build failed| +[0-9]+: )' \
            | head -40 || tail -40 "$logs/$t.build.log"
        result[$t]="build failed"
        failed=1
        continue
    fi
    echo "== $t: fuzzing for ${seconds}s"
    mkdir -p "corpus/$t" "artifacts/$t"
    set +e
    cargo fuzz run "${flags[@]}" "$t" -- \
        -max_total_time="$seconds" -print_final_stats=1 -timeout=10 "${extra[@]}" \
        >"$logs/$t.log" 2>&1
    rc=$?
    set -e
    grep -E '^Done [0-9]+ runs|^stat::' "$logs/$t.log" || true
    if [ "$rc" -eq 0 ]; then
        result[$t]="ok"
    else
        failed=1
        # The panic (or sanitizer report) and the input that caused it.
        grep -E -m3 "panicked at|^==[0-9]+==ERROR|ALARM: working on the last Unit|deadly signal|SUMMARY" \
            "$logs/$t.log" || true
        grep -E -A2 "^thread .* panicked at" "$logs/$t.log" | head -6 || true
        artifact="$(grep -E -o "artifacts/$t/[a-z]+-[0-9a-f]+" "$logs/$t.log" | tail -1 || true)"
        if [ -n "$artifact" ] && [ -f "$artifact" ]; then
            echo "input ($artifact, $(wc -c <"$artifact") bytes): $(od -An -v -tx1 "$artifact" | tr -d ' \n' | head -c 2000)"
        fi
        result[$t]="failed (exit $rc, log $logs/$t.log${artifact:+, input fuzz/$artifact})"
    fi
done

# plog_reader's scratch directories (/dev/shm/ferry-fuzz-plog-<pid>) of processes that ended.
shopt -s nullglob
for d in /dev/shm/ferry-fuzz-plog-* "${TMPDIR:-/tmp}"/ferry-fuzz-plog-*; do
    [ -d "/proc/${d##*-}" ] || rm -rf -- "$d"
done
shopt -u nullglob

echo "== summary"
for t in "${targets[@]}"; do
    execs="$(grep -E -o '^stat::number_of_executed_units: *[0-9]+' "$logs/$t.log" 2>/dev/null | grep -E -o '[0-9]+$' || true)"
    rate="$(grep -E -o '^stat::average_exec_per_sec: *[0-9]+' "$logs/$t.log" 2>/dev/null | grep -E -o '[0-9]+$' || true)"
    printf '%-14s %-60s executions=%s exec/s=%s\n' "$t" "${result[$t]}" "${execs:--}" "${rate:--}"
done
exit "$failed"
