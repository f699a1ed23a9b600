#!/usr/bin/env bash
# The main job on a fresh machine, no S3 account needed: build s4db, make a
# small demo database on the embedded local-directory backend, mount it, and
# use it with ls, cat, echo > and rm. Leaves it mounted with --keep.
#
#   scripts/demo.sh [--keep]
#
# Store: /tmp/s4db-demo-store (bucket "demo", prefix "db/"), mount: /tmp/s4db-demo.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
KEEP=0
[[ "${1:-}" == "--keep" ]] && KEEP=1

STORE=/tmp/s4db-demo-store
MNT=/tmp/s4db-demo
SUDO=""
if [[ $(id -u) -ne 0 ]] && command -v sudo >/dev/null; then SUDO="sudo"; fi
if ! command -v fusermount3 >/dev/null; then
  $SUDO apt-get update -q && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q fuse3
fi

cargo build --release --bins
BIN=$(pwd)/target/release
run() { printf '\n$ %s\n' "$*"; "$@"; }

mountpoint -q "$MNT" 2>/dev/null && fusermount3 -u "$MNT"
mkdir -p "$MNT"
if ! "$BIN/s4db" --local-store "$STORE" keys demo/db | grep -q .; then
  printf '%s\n' \
    '{"key": "hello.txt", "value": "hello, world\n"}' \
    '{"key": "notes/todo.txt", "value": "try s4db-mount\n"}' \
    '{"key": "images/dot.bin", "value_base64": "iVBORw0KGgo="}' |
    "$BIN/s4db" --local-store "$STORE" import demo/db
fi

run "$BIN/s4db-mount" --local-store "$STORE" demo/db "$MNT"
run ls -lR "$MNT"
run cat "$MNT/hello.txt"
printf '\n$ echo "written through the mount" > %s/new.txt\n' "$MNT"
echo "written through the mount" > "$MNT/new.txt"
run cat "$MNT/new.txt"
run rm -f "$MNT/notes/todo.txt"
# Attributes are kept in the bucket too: modes, owners, times, symlinks, empty directories.
run chmod 600 "$MNT/new.txt"
run ln -sfn hello.txt "$MNT/link.txt"
run mkdir -p -m 700 "$MNT/empty"
run ls -l "$MNT" "$MNT/notes"
run cat "$MNT/.s4db/stats"
printf '\n$ echo > %s/.s4db/upload\n' "$MNT"
echo > "$MNT/.s4db/upload"
run "$BIN/s4db" --local-store "$STORE" keys demo/db
run "$BIN/s4db" --local-store "$STORE" stat demo/db new.txt
if [[ $KEEP -eq 1 ]]; then
  echo
  echo "Mounted at $MNT; unmount with: fusermount3 -u $MNT"
else
  run fusermount3 -u "$MNT"
fi
