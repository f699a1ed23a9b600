#!/usr/bin/env bash
# The "Scale" figures: s4db-mount over a database of many keys, on a local moto S3 server.
#
#   scripts/bench_scale.sh [--keys N] [--out DIR]
#
#   --keys N     keys in 10 directories (default 1000000)
#   --out DIR    where scale.json and scale.md go (default target/bench)
#
# Makes N keys of 20 bytes (dir00/key-0000000001 ...) with small values through
# `s4db import` and `s4db upload`, mounts them on a fresh local directory
# (--upload-delay never --refresh-interval never) and reports:
#   - mount time: the command until it returns, and from the daemon's log how long
#     after the index GET returned the mount was ready;
#   - the daemon's VmRSS and VmHWM (/proc/PID/status) when ready, once the hint
#     objects are loaded (steady state) and after the listings;
#   - `ls -l` of one directory of N/10 keys through the mount (the first after
#     the mount, then the median of 3) with the S3 requests it sent (.s4db/stats),
#     and the same listing of as many files of the same sizes on local disk.
# Writes scale.json and scale.md (also printed) in target/bench or --out DIR.
#
# Needs fuse3 and .venv-test/py10 (moto); runs `scripts/test.sh --setup-only`
# when the venv is missing. Builds the release binaries, or uses the binaries
# in S4DB_BENCH_BIN=DIR (the test suite runs a tiny N on its debug build).
# About 2 minutes at 1,000,000 keys on 2 cores.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)

KEYS=1000000
OUT="${S4DB_BENCH_OUT:-$ROOT/target/bench}"
while [[ $# -gt 0 ]]; do
  case $1 in
    --keys) KEYS=$2; shift 2 ;;
    --keys=*) KEYS=${1#*=}; shift ;;
    --out) OUT=$2; shift 2 ;;
    --out=*) OUT=${1#*=}; shift ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "bench_scale.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
if ! [[ $KEYS =~ ^[0-9]+$ ]] || ((KEYS < 10)); then
  echo "bench_scale.sh: --keys needs a number >= 10" >&2
  exit 2
fi
DIRS=10
PER_DIR=$(((KEYS + DIRS - 1) / DIRS))
LISTED=dir00 # the directory listed: keys 1..PER_DIR

source "$ROOT/scripts/lib.sh"
bench_setup

mkdir -p "$OUT" "$ROOT/target/bench"
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d "$ROOT/target/bench/scale-work.XXXXXX")
MNT="$WORK/mnt"
mkdir -p "$MNT"
trap bench_cleanup EXIT
start_moto "$WORK/moto.log"
S3_ARGS=(--endpoint-url "$ENDPOINT" --force-path-style --region us-east-1)

now() { date +%s.%N; }
since() { echo "$(now) - $1" | bc; }

# The value of key i: small text of 18 to 27 bytes. The local-disk copy of the
# listed directory uses the same function, so its files have the same sizes.
VALUE_PY='def value(i): return "value %d %s\n" % (i, "x" * (i % 7))'

echo "bench_scale.sh: importing $KEYS keys" >&2
t0=$(now)
"$PY" -c "
import json, sys
$VALUE_PY
out = sys.stdout
for i in range($KEYS):
    out.write(json.dumps({'key': 'dir%02d/key-%010d' % (i // $PER_DIR, i + 1), 'value': value(i + 1)}) + '\n')
" | "$BIN/s4db" "${S3_ARGS[@]}" --local-dir "$WORK/import" --no-upload import --batch 10000 bench/scale
IMPORT_S=$(since "$t0")
t0=$(now)
"$BIN/s4db" "${S3_ARGS[@]}" --local-dir "$WORK/import" upload bench/scale >/dev/null
UPLOAD_S=$(since "$t0")
rm -rf "$WORK/import"
INDEX_BYTES=$("$PY" -c "import boto3; print(boto3.client('s3', endpoint_url='$ENDPOINT').head_object(Bucket='bench', Key='scale/index.idx')['ContentLength'])")

echo "bench_scale.sh: mounting" >&2
LOCAL="$WORK/mount-local"
LOG="$LOCAL/s4db-mount.log"
t0=$(now)
"$BIN/s4db-mount" "${S3_ARGS[@]}" --upload-delay never --refresh-interval never \
  bench/scale "$MNT" --local-dir "$LOCAL"
MOUNT_S=$(since "$t0")
PID=$(pgrep -n -f "s4db-mount .* $MNT")
memory() { # "rss_kb hwm_kb" of the daemon
  awk '/^VmRSS:/ {r = $2} /^VmHWM:/ {h = $2} END {print r, h}' "/proc/$PID/status"
}
MEM_READY=$(memory)
for _ in $(seq 600); do
  grep -q "hints preloaded" "$LOG" && break
  sleep 0.1
done
grep -q "hints preloaded" "$LOG" || { echo "bench_scale.sh: the hints were not loaded in 60 s" >&2; exit 1; }
MEM_LOADED=$(memory)
# "ready R s after start: index GET returned at G s, N keys loaded A s after it"
read -r READY_S INDEX_GET_S AFTER_GET_S < <(sed -n \
  's/.*ready \([0-9.]*\) s after start: index GET returned at \([0-9.]*\) s, [0-9]* keys loaded \([0-9.]*\) s after it.*/\1 \2 \3/p' \
  "$LOG" | tail -1)

requests() { # the stats' S3 request counters as "get=.. get_range=.. put=.. delete=.. list=.."
  "$PY" -c "import json; r = json.load(open('$MNT/.s4db/stats'))['s3_requests']; print(' '.join(f'{k}={r[k]}' for k in ('get', 'get_range', 'put', 'delete', 'list')))"
}
diff_requests() { # total requests between two `requests` outputs
  "$PY" -c "import sys; a, b = ({k: int(v) for k, v in (kv.split('=') for kv in s.split())} for s in sys.argv[1:]); print(sum(b[k] - a[k] for k in a))" "$1" "$2"
}
timed_ls() { # timed_ls DIR: seconds of one `ls -l DIR`
  local t0
  t0=$(now)
  ls -l "$1" >/dev/null
  since "$t0"
}
median() { tr ' ' '\n' | grep . | sort -g | awk '{a[NR] = $1} END {print a[int((NR + 1) / 2)]}'; }

echo "bench_scale.sh: listing $PER_DIR files" >&2
before=$(requests)
LS_FIRST_S=$(timed_ls "$MNT/$LISTED")
after=$(requests)
LS_FIRST_REQ=$(diff_requests "$before" "$after")
LS_TIMES=""
for _ in 1 2 3; do LS_TIMES+="$(timed_ls "$MNT/$LISTED") "; done
LS_REQ=$(diff_requests "$after" "$(requests)")
LS_MEDIAN_S=$(echo "$LS_TIMES" | median)
LS_COUNT=$(ls "$MNT/$LISTED" | wc -l)
MEM_LS=$(memory)

fusermount3 -u "$MNT"
while kill -0 "$PID" 2>/dev/null; do sleep 0.05; done

# The same listing on local disk, for comparison.
DISK="$WORK/disk/$LISTED"
mkdir -p "$DISK"
"$PY" -c "
$VALUE_PY
for i in range(1, $PER_DIR + 1):
    open('$DISK/key-%010d' % i, 'w').write(value(i))
"
DISK_FIRST_S=$(timed_ls "$DISK")
DISK_TIMES=""
for _ in 1 2 3; do DISK_TIMES+="$(timed_ls "$DISK") "; done
DISK_MEDIAN_S=$(echo "$DISK_TIMES" | median)

"$PY" - "$OUT" <<EOF
import json, sys
mem = lambda s: dict(zip(("rss_mb", "hwm_mb"), (round(int(v) / 1024, 1) for v in s.split())))
r = {
    "keys": $KEYS, "dirs": $DIRS, "keys_per_dir": $PER_DIR, "key_bytes": 20, "cores": $(nproc),
    "import_s": $IMPORT_S, "upload_s": $UPLOAD_S, "index_bytes": $INDEX_BYTES,
    "mount": {"command_s": $MOUNT_S, "ready_s": $READY_S, "index_get_s": $INDEX_GET_S,
              "ready_after_index_get_s": $AFTER_GET_S},
    "memory": {"ready": mem("$MEM_READY"), "hints_loaded": mem("$MEM_LOADED"), "after_ls": mem("$MEM_LS")},
    "ls_mount": {"entries": $LS_COUNT, "first_s": $LS_FIRST_S, "median_s": $LS_MEDIAN_S,
                 "first_s3_requests": $LS_FIRST_REQ, "next_3_s3_requests": $LS_REQ},
    "ls_disk": {"first_s": $DISK_FIRST_S, "median_s": $DISK_MEDIAN_S},
}
out = sys.argv[1]
json.dump(r, open(f"{out}/scale.json", "w"), indent=2)
m, mem, ls, disk = r["mount"], r["memory"], r["ls_mount"], r["ls_disk"]
md = f"""s4db-mount at scale: {r['keys']:,} keys of 20 bytes in {r['dirs']} directories, moto_server on loopback, {r['cores']} cores

| figure | value |
|---|---|
| s4db-mount until it returns | {m['command_s']:.2f} s |
| ready after the index GET ({r['index_bytes'] / 1e6:.1f} MB) returned | {m['ready_after_index_get_s']:.2f} s (GET returned at {m['index_get_s']:.2f} s, ready at {m['ready_s']:.2f} s) |
| daemon RSS / peak (VmHWM) when ready | {mem['ready']['rss_mb']:.0f} MB / {mem['ready']['hwm_mb']:.0f} MB |
| daemon RSS / peak, hint objects loaded | {mem['hints_loaded']['rss_mb']:.0f} MB / {mem['hints_loaded']['hwm_mb']:.0f} MB |
| daemon RSS / peak after the listings | {mem['after_ls']['rss_mb']:.0f} MB / {mem['after_ls']['hwm_mb']:.0f} MB |
| ls -l of {r['keys_per_dir']:,} files, first after mount | {ls['first_s']:.2f} s, {ls['first_s3_requests']} S3 requests |
| ls -l of {r['keys_per_dir']:,} files, median of 3 more | {ls['median_s']:.2f} s, {ls['next_3_s3_requests']} S3 requests in all 3 |
| ls -l of {r['keys_per_dir']:,} files on local disk, first / median of 3 | {disk['first_s']:.2f} s / {disk['median_s']:.2f} s |
"""
open(f"{out}/scale.md", "w").write(md)
print(md)
EOF
