#!/usr/bin/env bash
# pjdfstest (the POSIX file-system test suite, `cargo install pjdfstest --locked`) on local
# disk and on a mounted s4db, with one configuration, printing both summaries.
#
#   scripts/pjdfstest.sh                         local disk only (a temp dir under /tmp)
#   scripts/pjdfstest.sh --mount /mnt/db         local disk and the mount
#   scripts/pjdfstest.sh --local DIR --mount MNT --out OUTDIR [-- PATTERN...]
#
#   --local DIR    run the local-disk side in a new directory under DIR (default: /tmp)
#   --mount MNT    also run it in a new directory under MNT (a mount with --allow-other,
#                  daemon run as root: pjdfstest switches to other users)
#   --no-local     skip the local-disk side
#   --out OUTDIR   keep pjdfstest.toml, local.txt and mount.txt here (default: a temp dir)
#   PATTERN...     only the cases whose names contain one of these (pjdfstest's filter)
#
# Each side runs in a fresh 0755 directory owned by root and is removed afterwards; keep
# DIR and MNT short (the socket cases bind paths under them, 108 bytes at most). Needs
# root, the users nobody/nogroup and tests/tests (made here when missing). Exit status: 0
# when every side ran to its summary with no failure, 1 when a case failed, 2 when a side
# did not run to its summary (timeout, crash). $PJDFSTEST names the binary (default:
# `pjdfstest` on PATH, else ~/.cargo/bin/pjdfstest); $PJDFSTEST_TIMEOUT caps each side
# (seconds, default 600).
set -euo pipefail

LOCAL_BASE=/tmp
MOUNT=""
OUT=""
NO_LOCAL=0
PATTERNS=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --local) LOCAL_BASE=$2; shift 2 ;;
    --mount) MOUNT=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --no-local) NO_LOCAL=1; shift ;;
    --) shift; PATTERNS=("$@"); break ;;
    -h | --help) sed -n '2,21p' "$0"; exit 0 ;;
    *) echo "pjdfstest.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

if [[ $(id -u) -ne 0 ]]; then
  echo "pjdfstest.sh: run as root (pjdfstest changes owners and switches users)" >&2
  exit 2
fi

PJD=${PJDFSTEST:-}
if [[ -z "$PJD" ]]; then
  PJD=$(command -v pjdfstest || true)
  [[ -n "$PJD" ]] || PJD="${CARGO_HOME:-$HOME/.cargo}/bin/pjdfstest"
fi
if [[ ! -x "$PJD" ]]; then
  echo "pjdfstest.sh: pjdfstest not found: cargo install pjdfstest --version 0.2.2 --locked" \
    "(scripts/test.sh --setup-only does)" >&2
  exit 2
fi

# The users of dummy_auth below.
getent group nogroup >/dev/null || groupadd nogroup
id nobody >/dev/null 2>&1 || useradd -M -g nogroup nobody
id tests >/dev/null 2>&1 || useradd -M -U tests

if [[ -z "$OUT" ]]; then
  OUT=$(mktemp -d /tmp/pjdfstest-out.XXXXXX)
fi
mkdir -p "$OUT"
CONF="$OUT/pjdfstest.toml"
cat >"$CONF" <<'EOF'
[features]
posix_fallocate = {}
rename_ctime = {}
utime_now = {}
utimensat = {}

[settings]
naptime = 0.05
allow_remount = false

[dummy_auth]
entries = [["nobody", "nogroup"], ["tests", "tests"]]
EOF

STATUS=0
SUMMARIES=()
# run_side NAME BASE: pjdfstest in a new 0755 directory under BASE, output to OUT/NAME.txt.
run_side() {
  local name=$1 base=$2 dir rc=0
  dir=$(mktemp -d "$base/pjd.XXXXXX")
  chmod 0755 "$dir"
  echo "pjdfstest.sh: $name: $PJD -c $CONF -p $dir" >&2
  local started=$SECONDS
  NO_COLOR=1 CLICOLOR=0 timeout -k 10 "${PJDFSTEST_TIMEOUT:-600}" \
    "$PJD" -c "$CONF" -p "$dir" "${PATTERNS[@]}" >"$OUT/$name.txt" 2>"$OUT/$name.err" || rc=$?
  rm -rf "$dir" || echo "pjdfstest.sh: $name: could not remove $dir" >&2
  local summary
  summary=$(grep '^Summary:' "$OUT/$name.txt" || true)
  if [[ -z "$summary" ]]; then
    summary="no summary (exit $rc): see $OUT/$name.txt and $OUT/$name.err"
    STATUS=2
  elif [[ $rc -ne 0 && $STATUS -eq 0 ]]; then
    STATUS=1
  fi
  grep -E '[[:space:]]FAILED$' "$OUT/$name.txt" | sed "s/^/$name: /" || true
  SUMMARIES+=("$name ($((SECONDS - started)) s): $summary")
}

[[ $NO_LOCAL -eq 1 ]] || run_side local "$LOCAL_BASE"
[[ -z "$MOUNT" ]] || run_side mount "$MOUNT"

printf '%s\n' "${SUMMARIES[@]}"
echo "pjdfstest.sh: full output in $OUT" >&2
exit $STATUS
