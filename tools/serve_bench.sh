#!/usr/bin/env bash
# Served throughput and latency on this host: starts mmdit-server (the built-in model) on
# loopback, drives it with mmdit-loadgen at a few batch sizes and concurrencies, prints the
# server's batch metrics, then stops it with SIGTERM. Every run is bounded in requests and time.
# Usage: tools/serve_bench.sh [BIN_DIR] [RUNNER]   (RUNNER: a wrapper such as .gpu/run)
set -euo pipefail
bin=${1:-build}
run=${2:-}
find_bin() { for p in "$bin/$1" "$bin/server/$1" "$bin/client/$1" "$bin/bin/$1"; do [ -x "$p" ] && { echo "$p"; return; }; done; echo "missing $1 under $bin" >&2; exit 1; }
server=$(find_bin mmdit-server)
loadgen=$(find_bin mmdit-loadgen)
work=$(mktemp -d)
$run "$server" --host=127.0.0.1 --grpc_port=0 --http_port=0 --port_file="$work/ports" \
  >"$work/server.log" 2>&1 &
pid=$!
trap 'kill -TERM $pid 2>/dev/null; wait $pid 2>/dev/null; rm -rf "$work"' EXIT
for _ in $(seq 1 600); do [ -s "$work/ports" ] && break; sleep 0.1; done
cat "$work/ports"
grpc=$(sed -n 's/^grpc_port=//p' "$work/ports")
http=$(sed -n 's/^http_port=//p' "$work/ports")
[ -n "$grpc" ] || { echo "server did not become ready:" >&2; cat "$work/server.log" >&2; exit 1; }
# "BATCH,CLIENTS" pairs; SERVE_BENCH_CASES overrides them.
for case in ${SERVE_BENCH_CASES:-"1,1 1,8 8,32 16,32"}; do
  set -- ${case/,/ }
  echo "--- batch $1 per request, $2 clients"
  $run "$loadgen" --server="127.0.0.1:$grpc" --batch="$1" --concurrency="$2" \
    --requests=$((${SERVE_BENCH_REQUESTS:-2000} / $1)) --duration_s=${SERVE_BENCH_SECONDS:-15} --wait_ready_s=120
done
echo "--- server metrics"
exec 3<>"/dev/tcp/127.0.0.1/$http"
printf 'GET /metrics HTTP/1.0\r\n\r\n' >&3
cat <&3 | grep -E '^mmdit_(inference_count|inference_exec_count|batch_size_(sum|count)|compute_duration_seconds_(sum|count))' || true
grep -iE "worker|loaded|listening" "$work/server.log" | head -20
