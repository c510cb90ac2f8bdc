#!/usr/bin/env bash
# Served throughput and latency on this host: starts mmdit-server (the built-in model, or the
# models of SERVE_BENCH_REPOSITORY) on loopback, drives it with mmdit-loadgen at a few batch sizes
# and concurrencies, prints the server's batch metrics, then stops it with SIGTERM. Every run is
# bounded in requests and time.
# With SERVE_BENCH_ECHO=1 it also starts mmdit-echo-server (a bare gRPC echo of the same bytes,
# no batching, no compute) and runs the SERVE_BENCH_ECHO_CASES (default: batch 1 with 1 and 16
# clients) against both servers back to back, printing the p50 ratio served/echo (PERF.md's
# overhead goal: at most 1.3 at batch 1).
# Usage: tools/serve_bench.sh [BIN_DIR] [RUNNER]   (RUNNER: a wrapper such as .gpu/run)
# Environment: SERVE_BENCH_CASES ("BATCH,CLIENTS ..."), SERVE_BENCH_REQUESTS (2000 samples per
# case), SERVE_BENCH_SECONDS (15 per case), SERVE_BENCH_REPOSITORY (model repository; empty: the
# built-in model), SERVE_BENCH_MODEL (model name, default mmdit), SERVE_BENCH_ECHO,
# SERVE_BENCH_ECHO_CASES.
set -euo pipefail
bin=${1:-build}
run=${2:-}
find_bin() { for p in "$bin/$1" "$bin/server/$1" "$bin/client/$1" "$bin/bin/$1"; do [ -x "$p" ] && { echo "$p"; return; }; done; echo "missing $1 under $bin" >&2; exit 1; }
server=$(find_bin mmdit-server)
loadgen=$(find_bin mmdit-loadgen)
echo_server=
[ "${SERVE_BENCH_ECHO:-0}" = 1 ] && echo_server=$(find_bin mmdit-echo-server)
model=${SERVE_BENCH_MODEL:-mmdit}
requests=${SERVE_BENCH_REQUESTS:-2000}
seconds=${SERVE_BENCH_SECONDS:-15}
work=$(mktemp -d)
repo_flag=()
[ -n "${SERVE_BENCH_REPOSITORY:-}" ] && repo_flag=(--model_repository="$SERVE_BENCH_REPOSITORY")
$run "$server" "${repo_flag[@]}" --host=127.0.0.1 --grpc_port=0 --http_port=0 \
  --port_file="$work/ports" >"$work/server.log" 2>&1 &
pid=$!
echo_pid=
cleanup() {
  kill -TERM $pid 2>/dev/null; wait $pid 2>/dev/null
  [ -n "$echo_pid" ] && { kill -TERM $echo_pid 2>/dev/null; wait $echo_pid 2>/dev/null; }
  rm -rf "$work"
}
trap cleanup EXIT
for _ in $(seq 1 600); do [ -s "$work/ports" ] && break; sleep 0.1; done
cat "$work/ports"
grpc=$(sed -n 's/^grpc_port=//p' "$work/ports")
http=$(sed -n 's/^http_port=//p' "$work/ports")
[ -n "$grpc" ] || { echo "server did not become ready:" >&2; cat "$work/server.log" >&2; exit 1; }
# loadgen TARGET BATCH CLIENTS: one bounded run, its report on stdout.
loadgen() {
  $run "$loadgen" --server="$1" --model="$model" --batch="$2" --concurrency="$3" \
    --requests=$((requests / $2)) --duration_s="$seconds" --wait_ready_s=120
}
# "BATCH,CLIENTS" pairs (unquoted in the default, so that they split into cases);
# SERVE_BENCH_CASES overrides them.
for case in ${SERVE_BENCH_CASES:-1,1 1,8 8,32 16,32}; do
  set -- ${case/,/ }
  echo "--- batch $1 per request, $2 clients"
  loadgen "127.0.0.1:$grpc" "$1" "$2"
done
if [ -n "$echo_server" ]; then
  $run "$echo_server" --host=127.0.0.1 --grpc_port=0 --port_file="$work/echo_ports" \
    >"$work/echo.log" 2>&1 &
  echo_pid=$!
  for _ in $(seq 1 600); do [ -s "$work/echo_ports" ] && break; sleep 0.1; done
  echo_grpc=$(sed -n 's/^grpc_port=//p' "$work/echo_ports")
  [ -n "$echo_grpc" ] || { echo "echo server did not start:" >&2; cat "$work/echo.log" >&2; exit 1; }
  p50() { sed -n 's/.* p50 \([0-9.]*\) .*/\1/p' "$1"; }
  for case in ${SERVE_BENCH_ECHO_CASES:-1,1 1,16}; do
    set -- ${case/,/ }
    echo "--- echo comparison: batch $1 per request, $2 clients: served, then echo"
    loadgen "127.0.0.1:$grpc" "$1" "$2" | tee "$work/served.txt"
    loadgen "127.0.0.1:$echo_grpc" "$1" "$2" | tee "$work/echo.txt"
    awk -v s="$(p50 "$work/served.txt")" -v e="$(p50 "$work/echo.txt")" -v b="$1" -v c="$2" \
      'BEGIN { if (e > 0) printf "p50 served/echo (batch %s, %s clients): %.3f ms / %.3f ms = %.2f\n", b, c, s, e, s / e }'
  done
fi
echo "--- server metrics"
exec 3<>"/dev/tcp/127.0.0.1/$http"
printf 'GET /metrics HTTP/1.0\r\n\r\n' >&3
cat <&3 | grep -E '^mmdit_(inference_count|inference_exec_count|batch_size_(sum|count)|compute_duration_seconds_(sum|count))' || true
grep -iE "worker|loaded|listening" "$work/server.log" | head -20
