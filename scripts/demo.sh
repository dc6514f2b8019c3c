#!/usr/bin/env bash
# ferry's main job, for a newcomer: two clusters on this machine, `bj` (source) and `tj`
# (target), each with a coordinator, a storage node, a receiver and a shipper, sharing one etcd
# (each cluster under its own /ferry/<cluster>/ prefix) and certificates made by `certs`.
# It creates table `users` on both, adds an incremental duplication bj -> tj, loads bj with
# redis-benchmark while showing writes/s, shipped/s and lag, then proves with a per-partition
# digest that tj holds exactly what bj holds. Everything runs on loopback and is cleaned up.
#
#
# With --full it shows full duplication instead: table `users` exists on bj only and is filled
# first; `ferry dup add --full --wait` copies its checkpoints to tj (a progress bar, the copy held
# to 2 MB/s so it can be watched) while redis-benchmark keeps writing into bj; tj's coordinator
# creates the table, tj's node installs it, the dup reaches DS_LOG, the install-complete event
# fires on both sides, and the digests prove tj holds exactly bj's content.
#
#   scripts/demo.sh                 # 300k writes
#   DEMO_WRITES=1000000 scripts/demo.sh
#   scripts/demo.sh --full          # full duplication of an existing table
set -euo pipefail
cd "$(dirname "$0")/.."
full=0
case "${1:-}" in
  "") ;;
  --full) full=1 ;;
  *) echo "usage: scripts/demo.sh [--full]" >&2; exit 2 ;;
esac
scripts/setup.sh
echo "== building ferry (release; the first build compiles RocksDB and takes a while)"
cargo build --release --bins

bin=$PWD/target/release
writes=${DEMO_WRITES:-300000}
run=$(mktemp -d /tmp/ferry-demo.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  sleep 1
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  rm -rf "$run"
}
trap cleanup EXIT
fail() {
  echo "== FAILED: $*"
  for f in "$run"/*.log; do echo "--- $f (last lines)"; tail -5 "$f"; done
  exit 1
}

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
# Polls (bounded: 60 s) until a command succeeds.
wait_for() {
  local what=$1; shift
  for _ in $(seq 1 600); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
  fail "$what did not happen within 60 s"
}
metric() { # metric URL NAME: the sum of a metric's samples
  curl -s "$1/metrics" | awk -v n="$2" 'index($1, n) == 1 && (length($1) == length(n) || substr($1, length(n) + 1, 1) == "{") { s += $NF } END { printf "%d\n", s }'
}

echo "== etcd, and certificates for bj and tj (run dir $run)"
etcd_port=$(port); peer_port=$(port)
etcd --name demo --data-dir "$run/etcd" \
  --listen-client-urls "http://127.0.0.1:$etcd_port" --advertise-client-urls "http://127.0.0.1:$etcd_port" \
  --listen-peer-urls "http://127.0.0.1:$peer_port" --initial-advertise-peer-urls "http://127.0.0.1:$peer_port" \
  --initial-cluster "demo=http://127.0.0.1:$peer_port" --log-level error >"$run/etcd.log" 2>&1 &
pids+=($!)
etcd_url="http://127.0.0.1:$etcd_port"
wait_for "etcd start" etcdctl --endpoints="$etcd_url" endpoint health
"$bin/certs" init --out "$run/certs" --cluster bj --cluster tj >/dev/null

group='{ bj = 1, tj = 2 }'
declare -A coord resp http rhttp shttp
for c in bj tj; do coord[$c]=127.0.0.1:$(port); resp[$c]=$(port); http[$c]=$(port); rhttp[$c]=$(port); shttp[$c]=$(port); done

start_cluster() { # name id remote
  local c=$1 id=$2 remote=$3
  local cluster="[cluster]
name = \"$c\"
id = $id
duplication_group = $group

[etcd]
endpoints = [\"$etcd_url\"]
"
  printf '%s\n[coordinator]\nid = "%s-c1"\nlisten = "%s"\n\n[remote_clusters]\n%s = ["%s"]\n' \
    "$cluster" "$c" "${coord[$c]}" "$remote" "${coord[$remote]}" >"$run/$c-coordinator.toml"
  "$bin/coordinator" --config "$run/$c-coordinator.toml" >"$run/$c-coordinator.log" 2>&1 &
  pids+=($!)
  wait_for "$c coordinator start" curl -sf "http://${coord[$c]}/health"

  cat >"$run/$c-node.toml" <<EOF
cluster = "$c"
cluster_id = $id
duplication_group = $group
node_name = "$c-n1"
table = "users"
partitions = 8
data_dir = "$run/$c-data"
resp_addr = "127.0.0.1:${resp[$c]}"
http_addr = "127.0.0.1:${http[$c]}"
etcd_endpoints = ["$etcd_url"]
EOF
  "$bin/node" --config "$run/$c-node.toml" >"$run/$c-node.log" 2>&1 &
  pids+=($!)

  printf '%s\n[receiver]\nnode = "%s-n1"\nlisten = "127.0.0.1:%s"\nhttp_addr = "127.0.0.1:%s"\ndata_dir = "%s"\ncerts_dir = "%s"\nrtt_ms = 1\n' \
    "$cluster" "$c" "$(port)" "${rhttp[$c]}" "$run/$c-data" "$run/certs" >"$run/$c-receiver.toml"
  "$bin/receiver" --config "$run/$c-receiver.toml" >"$run/$c-receiver.log" 2>&1 &
  pids+=($!)

  printf '%s\n[remote_clusters]\n%s = ["%s"]\n\n[shipper]\nnode = "%s-n1"\ndata_dir = "%s"\ncerts_dir = "%s"\nhttp_addr = "127.0.0.1:%s"\nrtt_ms = 1\n' \
    "$cluster" "$remote" "${coord[$remote]}" "$c" "$run/$c-data" "$run/certs" "${shttp[$c]}" >"$run/$c-shipper.toml"
  "$bin/shipper" --config "$run/$c-shipper.toml" >"$run/$c-shipper.log" 2>&1 &
  pids+=($!)
  wait_for "$c receiver start" sh -c "curl -s http://127.0.0.1:${rhttp[$c]}/health | grep -q '\"serving\"'"
  wait_for "$c shipper start" sh -c "curl -s http://127.0.0.1:${shttp[$c]}/health | grep -q '\"running\"'"
  echo "   $c: coordinator ${coord[$c]}, node RESP 127.0.0.1:${resp[$c]}, receiver, shipper"
}

echo "== starting cluster bj (id 1) and cluster tj (id 2)"
start_cluster bj 1 tj
start_cluster tj 2 bj

if [ "$full" -eq 0 ]; then
  echo "== creating table users (8 partitions) on both clusters; the nodes open their client ports"
  for c in bj tj; do "$bin/ferry" -C "${coord[$c]}" table create users --partitions 8; done
  for c in bj tj; do wait_for "$c node serving" redis-cli -p "${resp[$c]}" ping; done

  echo "== adding an incremental duplication of users from bj to tj"
  "$bin/ferry" -C "${coord[bj]}" dup add -t users -c tj
  sleep 1

  echo "== redis-benchmark: $writes SETs of 100 bytes into bj (50 clients, pipeline 16)"
  redis-benchmark -p "${resp[bj]}" -t set -n "$writes" -r 1000000 -d 100 -c 50 -P 16 -q >"$run/benchmark.out" 2>&1 &
  bench=$!
  pids+=($bench)
else
  echo "== creating table users (8 partitions) on bj only; tj's node waits for it"
  "$bin/ferry" -C "${coord[bj]}" table create users --partitions 8
  wait_for "bj node serving" redis-cli -p "${resp[bj]}" ping
  echo "== filling bj: $writes SETs of 100 bytes (redis-benchmark, 50 clients, pipeline 16)"
  redis-benchmark -p "${resp[bj]}" -t set -n "$writes" -r 1000000 -d 100 -c 50 -P 16 -q 2>&1 \
    | tr '\r' '\n' | grep "requests per second" | sed 's/^/   /' || true
  echo "== bj keeps taking writes (redis-benchmark in the background) while the table is copied"
  redis-benchmark -p "${resp[bj]}" -t set -n $((writes / 3)) -r 1000000 -d 100 -c 10 -P 4 -q >"$run/benchmark.out" 2>&1 &
  bench=$!
  pids+=($bench)
  echo "== ferry dup add -t users -c tj --full --rate-mb 2 --wait   (the copy held to 2 MB/s, to watch it)"
  "$bin/ferry" -C "${coord[bj]}" dup add -t users -c tj --full --rate-mb 2 --wait || fail "the full duplication did not reach DS_LOG"
  echo "   tj node /health: $(curl -s "http://127.0.0.1:${http[tj]}/health")"
fi
node_url="http://127.0.0.1:${http[bj]}"; ship_url="http://127.0.0.1:${shttp[bj]}"
printf '   %6s  %12s  %12s  %10s  %8s\n' second "writes/s" "shipped/s" pending "lag ms"
w0=$(metric "$node_url" ferry_node_writes_total); s0=$(metric "$ship_url" dup_shipped_ops_total)
t=0
while [ $t -lt 600 ]; do
  sleep 1; t=$((t + 1))
  w1=$(metric "$node_url" ferry_node_writes_total); s1=$(metric "$ship_url" dup_shipped_ops_total)
  pending=$(metric "$ship_url" dup_pending_mutations)
  lag=$(curl -s "$ship_url/metrics" | awk '$1 ~ /^dup_lag_ms/ { if ($NF > m) m = $NF } END { printf "%d\n", m }')
  printf '   %6d  %12d  %12d  %10d  %8d\n' "$t" $((w1 - w0)) $((s1 - s0)) "$pending" "$lag"
  w0=$w1; s0=$s1
  if ! kill -0 "$bench" 2>/dev/null && [ "$pending" -eq 0 ]; then break; fi
done
tr '\r' '\n' <"$run/benchmark.out" | grep "requests per second" | sed 's/^/   redis-benchmark: /' || true

if [ "$full" -eq 1 ]; then
  echo "== the install-complete event, as each side's coordinator logged it"
  wait_for "install complete on tj" grep -q "install complete" "$run/tj-coordinator.log"
  for c in bj tj; do
    grep "install complete" "$run/$c-coordinator.log" | sed -e 's/^.*Z  *INFO [^ ]* //' -e "s/^/   $c: /" | head -9
  done
fi
echo "== the dup on bj: ferry dup list, then the shipper's per-partition view (/replica/duplication)"
"$bin/ferry" -C "${coord[bj]}" dup list -t users
python3 - "$(curl -s "$ship_url/replica/duplication?appid=1")" <<'EOF'
import json, sys
rows = json.loads(sys.argv[1])["duplications"]
print("   %9s  %9s  %9s  %9s  %7s  %6s  %s" % ("partition", "state", "confirmed", "committed", "pending", "lag_ms", "token"))
for r in rows:
    print("   %9s  %9s  %9s  %9s  %7s  %6s  %s" % (r["partition"], r["state"], r["confirmed_decree"],
          r["committed_decree"], r["pending_mutations"], r["lag_ms"], r["fencing_token"]))
EOF
echo "   tj node /health: $(curl -s "http://127.0.0.1:${http[tj]}/health")"

echo "== comparing the clusters' content, partition by partition"
converged=0
for _ in $(seq 1 120); do
  a=$(curl -s "http://127.0.0.1:${http[bj]}/digest"); b=$(curl -s "http://127.0.0.1:${http[tj]}/digest")
  if [ "$(echo "$a" | python3 -c 'import json,sys; print(json.load(sys.stdin)["content_hash"])')" = \
       "$(echo "$b" | python3 -c 'import json,sys; print(json.load(sys.stdin)["content_hash"])')" ]; then converged=1; break; fi
  sleep 0.5
done
python3 - "$a" "$b" <<'EOF'
import json, sys
a, b = json.loads(sys.argv[1]), json.loads(sys.argv[2])
print(f"   {'partition':>9}  {'bj entries':>10}  {'bj digest':>16}  {'tj entries':>10}  {'tj digest':>16}  same")
for pa, pb in zip(a["partitions"], b["partitions"]):
    same = pa["digest"] == pb["digest"] and pa["entries"] == pb["entries"]
    print(f"   {pa['partition']:>9}  {pa['entries']:>10}  {pa['digest']:>16}  {pb['entries']:>10}  {pb['digest']:>16}  {'yes' if same else 'NO'}")
print(f"   {'all':>9}  {a['entries']:>10}  {a['content_hash']:>16}  {b['entries']:>10}  {b['content_hash']:>16}")
EOF
sleep 1.5 # the shippers write their progress to etcd every second
echo "== ferry status of bj: each partition's progress, as etcd holds it"
"$bin/ferry" -C "${coord[bj]}" status | sed -n '/^TABLE/,$p'
if [ "$converged" -eq 1 ]; then
  echo "== OK: tj holds exactly bj's content (equal digests in every partition)"
else
  fail "tj did not converge to bj's content"
fi
