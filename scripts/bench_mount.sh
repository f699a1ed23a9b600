#!/usr/bin/env bash
# Workloads through a real s4db-mount on a local moto S3 server: wall time
# (median of RUNS) and the S3 requests each one sent (from .s4db/stats).
#
#   scripts/bench_mount.sh [N] [RUNS]     N small files (default 1000), RUNS repeats (default 3)
#
# Needs fuse3 and .venv-test/py10 (moto); runs `scripts/test.sh --setup-only`
# when the venv is missing. Builds the release binaries, or with
# S4DB_BENCH_BIN=DIR uses the binaries there (the test suite runs a tiny N on
# its debug build this way, to keep the script working).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)
N="${1:-1000}"
RUNS="${2:-3}"
K=$((N < 100 ? N : 100)) # files appended to and renamed

source "$ROOT/scripts/lib.sh"
bench_setup

WORK=$(mktemp -d /tmp/s4db-bench-mount.XXXXXX)
MNT="$WORK/mnt"
trap bench_cleanup EXIT
start_moto "$WORK/moto.log"

mkdir -p "$MNT"
mount_db() { # mount_db PREFIX LOCAL_DIR
  "$BIN/s4db-mount" --endpoint-url "$ENDPOINT" --force-path-style --upload-delay never \
    "bench/$1" "$MNT" --local-dir "$2"
}
unmount_db() {
  fusermount3 -u "$MNT"
  while pgrep -f "s4db-mount .* $MNT" >/dev/null; do sleep 0.05; done
}
requests() { # the stats' S3 request counters as "get=.. get_range=.. put=.. list=.."
  "$PY" -c "import json,sys; r=json.load(open('$MNT/.s4db/stats'))['s3_requests']; print(' '.join(f'{k}={r[k]}' for k in ('get','get_range','put','delete','list')))"
}
now() { date +%s.%N; }

declare -A TIMES REQS
record() { # record NAME SECONDS REQUESTS
  TIMES[$1]+="$2 "
  REQS[$1]="$3"
}
timed() { # timed NAME COMMAND...: runs it in the mount, records time and requests it sent
  local name=$1
  shift
  local before t0 t1
  before=$(requests)
  t0=$(now)
  (cd "$MNT" && eval "$*") >/dev/null
  t1=$(now)
  record "$name" "$(echo "$t1 - $t0" | bc)" "$(diff_requests "$before" "$(requests)")"
}
diff_requests() {
  "$PY" - "$1" "$2" <<'EOF'
import sys
a = dict(kv.split("=") for kv in sys.argv[1].split())
b = dict(kv.split("=") for kv in sys.argv[2].split())
print(" ".join(f"{k}={int(b[k]) - int(a[k])}" for k in a if int(b[k]) != int(a[k])) or "none")
EOF
}

head -c 256 /dev/urandom | base64 -w0 | head -c 256 >"$WORK/small"
for run in $(seq "$RUNS"); do
  prefix="run$run"
  mount_db "$prefix" "$WORK/local-$run"
  timed "create $N files of 256 B + publish" \
    "mkdir d && for i in \$(seq $N); do cp $WORK/small d/f\$i; done && echo > .s4db/upload"
  mkdir "$MNT/p"
  for i in $(seq 128); do head -c 65536 /dev/urandom >"$MNT/p/k$i"; done
  echo >"$MNT/.s4db/upload"
  unmount_db
  # A fresh machine: empty local directory, everything comes from S3.
  mount_db "$prefix" "$WORK/cold-$run"
  timed "64 cold reads of 64 KiB, one by one" "for i in \$(seq 64); do cat p/k\$i; done"
  timed "64 cold reads of 64 KiB, 64 in parallel" "seq 65 128 | xargs -P 64 -I{} cat p/k{}"
  timed "ls -l of $N files after a fresh mount" "ls -l d"
  timed "cold read of $N files (cat)" "cat d/* "
  timed "warm read of $N files (cat)" "cat d/*"
  timed "append to $K files (>>)" "for i in \$(seq $K); do echo more >> d/f\$i; done"
  timed "rename $K files (mv)" "for i in \$(seq $K); do mv d/f\$i d/g\$i; done"
  timed "rm -r of $N files + publish" "rm -r d && echo > .s4db/upload"
  unmount_db
  # The same listing on local disk, for comparison.
  mkdir -p "$WORK/disk/d"
  for i in $(seq "$N"); do cp "$WORK/small" "$WORK/disk/d/f$i"; done
  t0=$(now)
  ls -l "$WORK/disk/d" >/dev/null
  t1=$(now)
  record "ls -l of $N files on local disk" "$(echo "$t1 - $t0" | bc)" "-"
  rm -rf "$WORK/disk"
done

median() { tr ' ' '\n' | grep . | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
echo
echo "s4db-mount on moto_server (loopback), N=$N, median of $RUNS runs; $(nproc) cores"
echo
echo "| workload | seconds | S3 requests |"
echo "|---|---|---|"
for name in "create $N files of 256 B + publish" "ls -l of $N files after a fresh mount" \
  "ls -l of $N files on local disk" "cold read of $N files (cat)" "warm read of $N files (cat)" \
  "64 cold reads of 64 KiB, one by one" "64 cold reads of 64 KiB, 64 in parallel" "append to $K files (>>)" "rename $K files (mv)" \
  "rm -r of $N files + publish"; do
  printf '| %s | %.3f | %s |\n' "$name" "$(echo "${TIMES[$name]}" | median)" "${REQS[$name]}"
done
