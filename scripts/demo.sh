#!/usr/bin/env bash
# ferry's main job, for a newcomer: builds ferry, starts a storage node, loads it with
# redis-benchmark, kills it with SIGKILL, restarts it and shows that every acknowledged write is
# still there. Cleans up after itself.
#
# (Until duplication lands, this runs one node. The incremental-duplication issue turns it into
# the two-cluster demo.)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
echo "== building ferry (release; the first build compiles RocksDB and takes a while)"
cargo build --release --bins

run_dir=$(mktemp -d /tmp/ferry-demo.XXXXXX)
node_pid=""
cleanup() {
  if [ -n "$node_pid" ]; then kill -9 "$node_pid" 2>/dev/null || true; wait "$node_pid" 2>/dev/null || true; fi
  rm -rf "$run_dir"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
resp_port=$(free_port); http_port=$(free_port)

start_node() {
  ./target/release/node --data-dir "$run_dir/data" --partitions 8 --cluster-id 1 \
    --resp-addr "127.0.0.1:$resp_port" --http-addr "127.0.0.1:$http_port" >>"$run_dir/node.log" 2>&1 &
  node_pid=$!
  for _ in $(seq 1 300); do
    if redis-cli -p "$resp_port" ping >/dev/null 2>&1; then return 0; fi
    if ! kill -0 "$node_pid" 2>/dev/null; then echo "node exited; its log:"; cat "$run_dir/node.log"; exit 1; fi
    sleep 0.1
  done
  echo "node did not open its client port in 30 s; its log:"; cat "$run_dir/node.log"; exit 1
}

echo "== starting a node: 8 partitions, RESP on 127.0.0.1:$resp_port, HTTP on 127.0.0.1:$http_port"
start_node
echo "== redis-benchmark: every write is fsynced (group commit) before it is acknowledged"
redis-benchmark -p "$resp_port" -t set,get,incr,mset -n 100000 -r 100000 -c 50 -P 16 -d 100 -q
echo "== writing 1000 known keys, then kill -9"
for i in $(seq 1 1000); do echo "SET demo:$i value-$i"; done | redis-cli -p "$resp_port" >/dev/null
before=$(redis-cli -p "$resp_port" dbsize)
kill -9 "$node_pid"; wait "$node_pid" 2>/dev/null || true
echo "== restarting on the same data directory (the plog is replayed)"
start_node
after=$(redis-cli -p "$resp_port" dbsize)
missing=0
for i in $(seq 1 1000); do echo "GET demo:$i"; done | redis-cli -p "$resp_port" >"$run_dir/got"
for i in $(seq 1 1000); do echo "value-$i"; done | diff -q - "$run_dir/got" >/dev/null || missing=1
echo "keys before kill -9: $before, after restart: $after"
curl -s "http://127.0.0.1:$http_port/metrics" | grep -E '^ferry_node_(writes_total|group_commits_total|committed_decree)' | head -12
if [ "$missing" -eq 0 ] && [ "$before" = "$after" ]; then
  echo "== OK: every acknowledged write survived kill -9"
else
  echo "== FAILED: writes were lost"; exit 1
fi
