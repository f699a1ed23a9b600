#!/usr/bin/env bash
# Benchmarks: our Rust engine (criterion, benches/engine.rs) and the real Python
# s4db 0.10.0 (scripts/bench_python.py) on the same workloads, against one moto
# S3 server, side by side. Results: target/bench/table.md; scripts/bench.sh runs the whole suite.
#
#   scripts/bench_micro.sh              everything (about 10 minutes on 2 cores, after the build)
#   scripts/bench_micro.sh 'moto/'      only benchmarks whose id matches this regex (both sides)
#   scripts/bench_micro.sh --quick      smoke test: Rust in criterion's test mode, few Python samples
#
# Needs .venv-test/py10 (moto, boto3, s4db 0.10.0); runs `scripts/test.sh --setup-only`
# when it is missing. If .venv-test/py08 exists, s4db 0.8.0's put workloads run too.
# Output: the table on stdout and in target/bench/table.md; logs in target/bench/.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)

QUICK=0
if [[ "${1:-}" == "--quick" ]]; then
  QUICK=1
  shift
fi
FILTER="${1:-}"

PY="$ROOT/.venv-test/py10/bin/python"
PY08="$ROOT/.venv-test/py08/bin/python"
MOTO_SERVER="${S4DB_MOTO_SERVER:-$ROOT/.venv-test/py10/bin/moto_server}"
if [[ ! -x "$PY" || ! -x "$MOTO_SERVER" ]]; then
  "$ROOT/scripts/test.sh" --setup-only
fi

OUT="$ROOT/target/bench"
mkdir -p "$OUT"
rm -f "$OUT"/python.json "$OUT"/python08.json "$OUT"/cargo-bench.log

# ---- moto on a free port, stopped on exit
PORT=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$MOTO_SERVER" -H 127.0.0.1 -p "$PORT" >"$OUT/moto.log" 2>&1 &
MOTO_PID=$!
stop_moto() {
  kill "$MOTO_PID" 2>/dev/null || true
  wait "$MOTO_PID" 2>/dev/null || true
}
trap stop_moto EXIT
ENDPOINT="http://127.0.0.1:$PORT"
for _ in $(seq 1 100); do
  if "$PY" -c "import urllib.request, sys; urllib.request.urlopen(sys.argv[1], timeout=1)" "$ENDPOINT" 2>/dev/null; then
    break
  fi
  if ! kill -0 "$MOTO_PID" 2>/dev/null; then
    echo "bench_micro.sh: moto_server exited; log:" >&2
    cat "$OUT/moto.log" >&2
    exit 1
  fi
  sleep 0.2
done
echo "bench_micro.sh: moto at $ENDPOINT (pid $MOTO_PID)" >&2

# ---- Rust
export S4DB_BENCH_MOTO_ENDPOINT="$ENDPOINT"
start=$(date +%s)
if [[ $QUICK -eq 1 ]]; then
  # Test mode: each benchmark once, small setups; no criterion results are saved.
  cargo test --release --bench engine -- ${FILTER:+"$FILTER"} 2>&1 | tee "$OUT/cargo-bench.log"
else
  cargo bench --bench engine -- ${FILTER:+"$FILTER"} 2>&1 | tee "$OUT/cargo-bench.log"
fi
echo "bench_micro.sh: cargo bench took $(($(date +%s) - start)) s" >&2

# ---- Python
start=$(date +%s)
PYARGS=(run --endpoint "$ENDPOINT" --filter "$FILTER")
[[ $QUICK -eq 1 ]] && PYARGS+=(--quick)
"$PY" "$ROOT/scripts/bench_python.py" "${PYARGS[@]}" --json "$OUT/python.json"
if [[ -x "$PY08" ]]; then
  "$PY08" "$ROOT/scripts/bench_python.py" "${PYARGS[@]}" --json "$OUT/python08.json"
fi
echo "bench_micro.sh: Python benchmarks took $(($(date +%s) - start)) s" >&2

# ---- table
# (criterion saves no results in test mode: no Rust times then)
CRIT=(--criterion "$ROOT/target/criterion")
[[ $QUICK -eq 1 ]] && CRIT=()
echo
"$PY" "$ROOT/scripts/bench_python.py" table "${CRIT[@]}" --filter "$FILTER" \
  --rust-log "$OUT/cargo-bench.log" --python "$OUT/python.json" \
  --python08 "$OUT/python08.json" | tee "$OUT/table.md"
