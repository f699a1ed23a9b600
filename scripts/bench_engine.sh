#!/usr/bin/env bash
# Engine workloads, the Rust engine (benches/workloads.rs) vs the real Python s4db 0.10.0
# (scripts/bench_engine_python.py), side by side against ONE moto_server: batched vs
# one-at-a-time puts, a 100,000-key bulk load + upload, local and remote get latency
# (mean/p50/p95/p99), point reads at 100,000 keys, s4db vs one S3 object per key.
# The workloads, the data and the JSON schema are described at the top of
# benches/workloads.rs.
#
#   scripts/bench_engine.sh [--quick] [--rtt-ms MS[,MS...]] [--keys N] [--runs R]
#
#   --rtt-ms L  comma-separated passes (default 0,20). 0: straight to moto, every workload.
#               L > 0: through scripts/latency_proxy.py adding L ms per round trip, only the
#               workloads that talk to S3 per key (remote_get, one_object_per_key); the
#               others are local and would measure the same thing again. One object per
#               key then writes 150 values, not 1000: sequential PUTs cost a round trip each
#               (the 1000 of both sides would take 1.5 minutes at 20 ms).
#   --keys N    database size of the bulk load and the reads (default 100000)
#   --runs R    runs per workload, medians reported (default 3; a workload whose first
#               run took over 5 s runs once)
#   --quick     smoke test: tiny sizes, one run (the test suite runs this)
#
# Output per RTT: target/bench/engine-<rtt>ms.json (both sides' raw results, keyed
# "rust" and "python") and target/bench/engine-<rtt>ms.md (the table, also on stdout);
# logs in target/bench/engine-logs/. $S4DB_BENCH_OUT replaces target/bench (tests).
#
# The Rust side: $S4DB_BENCH_WORKLOADS_BIN if set (tests pass the dev build cargo made),
# else `cargo bench --bench workloads --no-run` (the bench profile = release) and that
# binary. Python: $S4DB_TEST_PY10, else .venv-test/py10/bin/python; moto:
# $S4DB_MOTO_SERVER, else .venv-test/py10/bin/moto_server (`scripts/test.sh --setup-only`
# makes the venvs when missing). At the defaults it takes about 2-3 minutes on 2 cores,
# after the build.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)
source "$ROOT/scripts/lib.sh" # stop_pids

QUICK=0
RTTS=0,20
EXTRA=()
while [[ $# -gt 0 ]]; do
  case "$1" in
  --quick) QUICK=1; shift ;;
  --rtt-ms) RTTS=$2; shift 2 ;;
  --keys | --runs) EXTRA+=("$1" "$2"); shift 2 ;;
  -h | --help) sed -n '2,/^set -e/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
  *) echo "bench_engine.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
[[ $QUICK -eq 1 ]] && EXTRA+=(--quick)
log() { echo "bench_engine.sh: $*" >&2; }

PY="${S4DB_TEST_PY10:-$ROOT/.venv-test/py10/bin/python}"
MOTO_SERVER="${S4DB_MOTO_SERVER:-$ROOT/.venv-test/py10/bin/moto_server}"
[[ -x "$PY" && -x "$MOTO_SERVER" ]] || "$ROOT/scripts/test.sh" --setup-only

if [[ -n "${S4DB_BENCH_WORKLOADS_BIN:-}" ]]; then
  WORKLOADS_BIN="$S4DB_BENCH_WORKLOADS_BIN"
else
  # The executable's path is the last "Executable" line cargo prints.
  WORKLOADS_BIN=$(cargo bench --bench workloads --no-run --message-format=json 2>/dev/null |
    "$PY" -c 'import json, sys
exe = [m["executable"] for m in map(json.loads, sys.stdin)
       if m.get("reason") == "compiler-artifact" and m.get("executable")
       and m["target"]["name"] == "workloads"]
print(exe[-1] if exe else "")')
  [[ -n "$WORKLOADS_BIN" ]] || { log "cargo bench --bench workloads --no-run failed"; exit 1; }
fi
[[ -x "$WORKLOADS_BIN" ]] || { log "no workloads binary at $WORKLOADS_BIN"; exit 1; }

OUT="${S4DB_BENCH_OUT:-$ROOT/target/bench}"
LOGS="$OUT/engine-logs"
mkdir -p "$LOGS"

# Explicit endpoint, region and credentials on both sides; nothing from the host's AWS
# configuration, no HTTP proxy for loopback traffic.
export AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_REGION=us-east-1
export AWS_CONFIG_FILE=/nonexistent AWS_SHARED_CREDENTIALS_FILE=/nonexistent
unset AWS_CA_BUNDLE AWS_PROFILE AWS_ENDPOINT_URL AWS_ENDPOINT_URL_S3 AWS_DEFAULT_REGION AWS_SESSION_TOKEN
unset http_proxy https_proxy HTTP_PROXY HTTPS_PROXY all_proxy ALL_PROXY
export NO_PROXY=127.0.0.1,localhost no_proxy=127.0.0.1,localhost

# ---- everything started is stopped on exit, newest first, by pid
WORK=$(mktemp -d /tmp/s4db-bench-engine.XXXXXX)
PIDS=()
cleanup() {
  set +e
  stop_pids "${PIDS[@]}"
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
free_port() { "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
wait_port() { # wait_port PORT PID: until something accepts on PORT (or PID died)
  for _ in $(seq 150); do
    "$PY" -c "import socket, sys; socket.create_connection(('127.0.0.1', int(sys.argv[1])), 1)" \
      "$1" 2>/dev/null && return 0
    kill -0 "$2" 2>/dev/null || return 1
    sleep 0.1
  done
  return 1
}

MOTO_PORT=$(free_port)
"$MOTO_SERVER" -H 127.0.0.1 -p "$MOTO_PORT" >"$LOGS/moto.log" 2>&1 &
PIDS+=($!)
wait_port "$MOTO_PORT" "${PIDS[0]}" || { log "moto_server did not start:"; cat "$LOGS/moto.log" >&2; exit 1; }
MOTO="http://127.0.0.1:$MOTO_PORT"
log "moto at $MOTO; Rust: $WORKLOADS_BIN"

for RTT in ${RTTS//,/ }; do
  EP="$MOTO"
  ONLY=()
  PROXY_PID=""
  if [[ $RTT != 0 ]]; then
    PROXY_PORT=$(free_port)
    python3 "$ROOT/scripts/latency_proxy.py" "$PROXY_PORT" 127.0.0.1 "$MOTO_PORT" \
      --rtt-ms "$RTT" --log "$LOGS/requests-${RTT}ms.log" 2>"$LOGS/proxy-${RTT}ms.log" &
    PROXY_PID=$!
    PIDS+=("$PROXY_PID")
    wait_port "$PROXY_PORT" "$PROXY_PID" || { log "latency proxy did not start"; exit 1; }
    EP="http://127.0.0.1:$PROXY_PORT"
    ONLY=(--only remote_get,one_object_per_key)
    [[ $QUICK -eq 1 ]] || ONLY+=(--naive-keys 150)
  fi
  start=$(date +%s)
  log "RTT $RTT ms: endpoint $EP"
  "$WORKLOADS_BIN" --endpoint "$EP" "${EXTRA[@]}" "${ONLY[@]}" --json "$WORK/rust.json" \
    2> >(tee "$LOGS/rust-${RTT}ms.log" >&2)
  "$PY" "$ROOT/scripts/bench_engine_python.py" --endpoint "$EP" "${EXTRA[@]}" "${ONLY[@]}" \
    --json "$WORK/python.json" 2> >(tee "$LOGS/python-${RTT}ms.log" >&2)
  log "RTT $RTT ms took $(($(date +%s) - start)) s"
  if [[ -n "$PROXY_PID" ]]; then
    kill "$PROXY_PID"
    wait "$PROXY_PID" 2>/dev/null || true
    keep=()
    for pid in "${PIDS[@]}"; do [[ $pid == "$PROXY_PID" ]] || keep+=("$pid"); done
    PIDS=("${keep[@]}")
  fi

  "$PY" - "$WORK/rust.json" "$WORK/python.json" "$OUT/engine-${RTT}ms.json" "$RTT" <<'PYEOF'
import json, sys
rust, py, out, rtt = sys.argv[1:]
with open(rust) as r, open(py) as p:
    both = {"rtt_ms": int(rtt), "rust": json.load(r), "python": json.load(p)}
with open(out, "w") as f:
    json.dump(both, f, indent=2)
    f.write("\n")
PYEOF
  if [[ $RTT == 0 ]]; then title="moto_server on loopback, no added latency"; else title="moto_server behind latency_proxy.py, +$RTT ms per round trip"; fi
  echo
  "$PY" "$ROOT/scripts/bench_engine_python.py" table --rust "$WORK/rust.json" \
    --python "$WORK/python.json" --title "Engine workloads: $title" --out "$OUT/engine-${RTT}ms.md"
  echo
done
