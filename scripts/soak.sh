#!/usr/bin/env bash
# A mount that runs for months, compressed into minutes: one s4db-mount writer makes
# UPLOADS uploads of one small file each (plus overwrites and deletes) with background
# compaction and gc at short intervals, while a second mount and a reader loop read; every
# SAMPLE uploads it records the object count in the bucket, what a fresh mount's first
# `ls -lR` costs (S3 requests, seconds), both daemons' RSS and the writer's local directory.
#
#   scripts/soak.sh [UPLOADS] [SAMPLE] [KEYS]   defaults 20000, 1000 and 2000
#
# Each upload writes (or overwrites) one of KEYS files, so the live data stays the same
# size while the history grows: what must stay flat is what the history costs.
#
# Writes target/soak/soak.csv (and both mounts' map sizes, `.s4db/stats` "memory", to
# target/soak/memory.jsonl) and, with matplotlib (.venv-test/bench, made on first use
# as for bench_chart.py), target/soak/soak.png. Runs against one local moto_server;
# S4DB_BENCH_BIN picks the binaries (default: a fresh release build).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
source scripts/lib.sh
UPLOADS=${1:-20000}
SAMPLE=${2:-1000}
KEYS=${3:-2000}
OUT="$ROOT/target/soak"
mkdir -p "$OUT"
WORK=$(mktemp -d /tmp/s4db-soak-XXXXXX)
MNT="$WORK/w"
PIDS=()
cleanup() {
  for m in "$WORK"/w "$WORK"/r "$WORK"/f; do fusermount3 -uz "$m" 2>/dev/null || true; done
  stop_pids "${PIDS[@]}" 2>/dev/null || true
  bench_cleanup
}
trap cleanup EXIT
bench_setup
start_moto "$WORK/moto.log"
mkdir -p "$WORK/w" "$WORK/r" "$WORK/f"

COMMON=(--endpoint-url "$ENDPOINT" --region us-east-1 --force-path-style -f)
wait_mounted() { for _ in $(seq 100); do mountpoint -q "$1" && return 0; sleep 0.1; done; echo "soak: $1 did not mount" >&2; exit 1; }
# The writer: every write published at once by .s4db/upload (the worst case: one data
# file and one hint object per upload), compaction every second, gc every 2 s with a 5 s
# grace, an 8 MiB local cache cap.
"$BIN/s4db-mount" "${COMMON[@]}" --local-dir "$WORK/w-local" \
  --compact 1 --gc 2 --gc-grace 5 --max-cache-size 8388608 --upload-delay 0.05 bench/soak "$WORK/w" \
  >"$WORK/w.log" 2>&1 &
WPID=$!; PIDS+=("$WPID")
# A second mount that reads what the writer publishes (refreshing every second).
"$BIN/s4db-mount" "${COMMON[@]}" --local-dir "$WORK/r-local" --refresh-interval 1 \
  --compact never --gc never bench/soak "$WORK/r" >"$WORK/r.log" 2>&1 &
RPID=$!; PIDS+=("$RPID")
wait_mounted "$WORK/w"; wait_mounted "$WORK/r"
for d in $(seq 0 99); do mkdir -p "$WORK/w/d$d"; done
echo > "$WORK/w/.s4db/upload"

# Readers: the second mount's files, over and over.
( while sleep 0.5; do find "$WORK/r" -path "$WORK/r/.s4db" -prune -o -type f -print 2>/dev/null \
    | shuf -n 50 2>/dev/null | xargs -r cat >/dev/null 2>&1 || true; done ) &
PIDS+=("$!")

count_objects() {
  "$PY" - "$ENDPOINT" <<'PY'
import sys, boto3
s3 = boto3.client("s3", endpoint_url=sys.argv[1])
n = data = 0
for page in s3.get_paginator("list_objects_v2").paginate(Bucket="bench", Prefix="soak/"):
    for o in page.get("Contents", []):
        n += 1
        data += o["Key"].split("/")[-1].startswith("data_")
print(n, data)
PY
}

# A fresh mount (fresh local dir, no maintenance): its first ls -lR, in requests and seconds.
fresh_listing() {
  rm -rf "$WORK/f-local"
  "$BIN/s4db-mount" "${COMMON[@]}" --local-dir "$WORK/f-local" --compact never --gc never \
    bench/soak "$WORK/f" >"$WORK/f.log" 2>&1 &
  local pid=$!
  wait_mounted "$WORK/f"
  local t0 t1 n
  t0=$(date +%s.%N)
  n=$(ls -lR "$WORK/f" | grep -c '^-' || true)
  t1=$(date +%s.%N)
  sleep 0.3
  local reqs
  reqs=$("$PY" -c 'import json,sys; r=json.load(open(sys.argv[1]))["s3_requests"]; print(sum(r[k] for k in ("get","get_range","put","delete","list","head")))' "$WORK/f/.s4db/stats")
  fusermount3 -u "$WORK/f"; wait "$pid" || true
  echo "$reqs $(echo "$t1 - $t0" | bc) $n"
}

rss_kb() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }

CSV="$OUT/soak.csv"
MEM="$OUT/memory.jsonl"
: >"$MEM"
echo "uploads,elapsed_s,objects,data_objects,fresh_ls_requests,fresh_ls_seconds,files_listed,writer_rss_kb,reader_rss_kb,local_dir_bytes,compactions,objects_deleted,reader_gets" >"$CSV"
T0=$(date +%s.%N)
sample() {
  local objs fresh stats
  read -r objs data < <(count_objects)
  read -r reqs secs listed < <(fresh_listing)
  stats=$("$PY" -c 'import json,sys; m=json.load(open(sys.argv[1]))["maintenance"]; print(m["compactions"], m["objects_deleted"])' "$WORK/w/.s4db/stats")
  # Both mounts' map sizes (.s4db/stats "memory") to memory.jsonl; the reader's GETs
  # (index and hint objects: it keeps refreshing) to the CSV.
  local gets
  gets=$("$PY" - "$1" "$WORK/w/.s4db/stats" "$WORK/r/.s4db/stats" "$MEM" <<'PY'
import json, sys
n, w, r, out = sys.argv[1:]
w, r = json.load(open(w)), json.load(open(r))
with open(out, "a") as f:
    f.write(json.dumps({"uploads": int(n), "writer": w.get("memory"), "reader": r.get("memory")}) + "\n")
print(r["s3_requests"]["get"])
PY
)
  local line
  line="$1,$(echo "$(date +%s.%N) - $T0" | bc),$objs,$data,$reqs,$secs,$listed,$(rss_kb "$WPID"),$(rss_kb "$RPID"),$(du -sb "$WORK/w-local" | cut -f1),${stats// /,},$gets"
  echo "$line" >>"$CSV"
  echo "soak: $line"
}
sample 0
i=1
while [ "$i" -le "$UPLOADS" ]; do
  # Keys cycle through KEYS files: the live data stays the same size while the history
  # grows; every 50th upload also deletes one.
  k=$((i % KEYS))
  printf 'value %d %s\n' "$i" "$(head -c 96 /dev/zero | tr '\0' x)" >"$WORK/w/d$((k % 100))/f$k"
  if [ $((i % 50)) -eq 0 ]; then k=$(((i / 3) % KEYS)); rm -f "$WORK/w/d$((k % 100))/f$k"; fi
  echo > "$WORK/w/.s4db/upload"
  if [ $((i % SAMPLE)) -eq 0 ]; then sample "$i"; fi
  i=$((i + 1))
done
# Let the last rounds and gc (5 s grace) settle, then a final sample.
sleep 12
sample "$UPLOADS"
"$PY" scripts/soak_chart.py "$CSV" "$OUT/soak.png" || echo "soak: no chart (matplotlib unavailable)"
echo "soak: $CSV, $MEM"
