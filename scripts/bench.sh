#!/usr/bin/env bash
# The whole benchmark suite in one go, writing docs/BENCHMARKS.md (figures, ratios, S3
# request costs, the targets met or missed) and its chart docs/bench-peers-20ms.png.
#
#   scripts/bench.sh           everything: about 29 minutes on 2 cores after the build
#   scripts/bench.sh --quick   smoke test with tiny sizes (the test suite runs it); writes
#                              target/bench/quick/BENCHMARKS.md, never docs/
#
# The parts, each runnable on its own (see its --help):
#   scripts/bench_engine.sh  the engine against the Python s4db 0.10.0 library
#   scripts/bench_peers.sh   s4db-mount against s3fs and rclone mount (and the local disk),
#                            without and with 20 ms of added round trip
#   scripts/bench_scale.sh   1,000,000 keys: mount time, daemon memory, ls -l of 100,000
#   scripts/bench_report.py  docs/BENCHMARKS.md from their JSON results
# Installs what it needs (s3fs, rclone, fio with apt-get; the Python venvs; matplotlib in
# .venv-test/bench) and builds the release binaries. Micro-benchmarks (criterion) are
# scripts/bench_micro.sh, not part of this run.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)
QUICK=()
[[ "${1:-}" == --quick ]] && QUICK=(--quick)

source "$ROOT/scripts/lib.sh"
start=$(date +%s)
OUT="$ROOT/target/bench"
DOC="$ROOT/docs/BENCHMARKS.md"
CHART="$ROOT/docs/bench-peers-20ms.png"
SCALE=()
if [[ ${#QUICK[@]} -gt 0 ]]; then
  OUT="$ROOT/target/bench/quick"
  DOC="$OUT/BENCHMARKS.md"
  CHART="$OUT/bench-peers-20ms.png"
  SCALE=(--keys 2000)
fi
mkdir -p "$OUT"
export S4DB_BENCH_OUT="$OUT"

bench_setup # venvs, and $BIN: the release binaries (or S4DB_BENCH_BIN)
export S4DB_BENCH_BIN="$BIN"

step() { echo "bench.sh: $* ($(($(date +%s) - start)) s so far)" >&2; }
step "engine against Python"
scripts/bench_engine.sh "${QUICK[@]}"
step "mount against s3fs and rclone"
scripts/bench_peers.sh "${QUICK[@]}" --rtt-ms 0,20
step "1,000,000 keys"
scripts/bench_scale.sh "${SCALE[@]}"
step "chart and report"
"$PY" scripts/bench_chart.py "$OUT/peers-20ms.json" "$CHART"
"$PY" scripts/bench_report.py --results "$OUT" --out "$DOC" --chart "$CHART" \
  --duration-s "$(($(date +%s) - start))"
step "done: $DOC"
