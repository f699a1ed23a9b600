#!/usr/bin/env bash
# The one command that makes a fresh Debian machine pass the tests.
#
#   scripts/test.sh                  set up (idempotent), build, run all tests
#   scripts/test.sh compat           ... extra args go to `cargo test` (here: a name filter)
#   scripts/test.sh --setup-only     only install the system packages and Python venvs
#
# Set-up, each step skipped when already done:
#   - fuse3 (fusermount3), rsync, attr, git, tar and the user tools the mount tests use
#   - podman, runc, debootstrap and the base image of tests/container.rs (scripts/container.sh)
#   - pjdfstest 0.2.2 (cargo install) and its users nobody/nogroup and tests/tests
#   - .venv-test/py10: moto[server] + boto3 + s4db 0.10.0 (S3 mock server and reference impl.)
#   - .venv-test/py08: s4db 0.8.0 + boto3 (reference impl. of the old format)
# The tests find these through S4DB_TEST_PY10, S4DB_TEST_PY08 and S4DB_MOTO_SERVER.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)

SETUP_ONLY=0
if [[ "${1:-}" == "--setup-only" ]]; then
  SETUP_ONLY=1
  shift
fi

# ---- system packages (apt-get update only when something must be installed)
source "$ROOT/scripts/lib.sh"

command -v fusermount3 >/dev/null || apt_install fuse3
# script(1) gives the progress-bar test a terminal.
command -v script >/dev/null || apt_install bsdutils
# Real programs the mount tests run against the mount.
command -v rsync >/dev/null || apt_install rsync
command -v runuser >/dev/null || apt_install util-linux
command -v useradd >/dev/null || apt_install passwd
# The programs tests/posix.rs compares on local disk and on the mount.
command -v setfattr >/dev/null || apt_install attr
command -v git >/dev/null || apt_install git
command -v tar >/dev/null || apt_install tar
# The peers and tools of the benchmark scripts, which the tests run on a tiny N.
for tool in s3fs rclone fio bc; do
  command -v $tool >/dev/null || apt_install $tool
done
# tests/container.rs: podman (run with runc) and debootstrap; scripts/container.sh then
# writes its containers.conf and makes the debootstrap base image (once, about a minute).
for tool in podman runc debootstrap; do
  command -v $tool >/dev/null || apt_install $tool
done
"$ROOT/scripts/container.sh" setup >/dev/null
command -v python3 >/dev/null || apt_install python3 python3-venv
# Debian's own python3 needs python3-venv for `python3 -m venv`.
python3 -c 'import venv, ensurepip' 2>/dev/null || apt_install python3-venv

# ---- pjdfstest (tests/posix.rs, scripts/pjdfstest.sh) and the users it switches to
PJDFSTEST_VERSION=0.2.2
export PATH="$PATH:${CARGO_HOME:-$HOME/.cargo}/bin"
if [[ "$(pjdfstest --version 2>/dev/null)" != "pjdfstest $PJDFSTEST_VERSION" ]]; then
  cargo install pjdfstest --version "$PJDFSTEST_VERSION" --locked
fi
# nobody/nogroup come with Debian; tests/tests is pjdfstest's second user. Needs root, as
# the mount tests do.
if [[ $(id -u) -eq 0 ]]; then
  getent group nogroup >/dev/null || groupadd nogroup
  id nobody >/dev/null 2>&1 || useradd -M -g nogroup nobody
  id tests >/dev/null 2>&1 || useradd -M -U tests
fi

# ---- Python venvs, rebuilt only when their requirement list (stamp) changes
PY10_REQS=("moto[server]==5.2.5" "boto3" "s4db==0.10.0")
PY08_REQS=("boto3" "s4db==0.8.0")

make_venv() { # make_venv DIR REQUIREMENT...
  local dir=$1
  shift
  local stamp="$dir/.requirements.stamp"
  local want
  want="$(python3 --version 2>&1)"$'\n'"$(printf '%s\n' "$@")"
  if [[ -x "$dir/bin/python" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    return 0
  fi
  echo "test.sh: creating $dir ($*)" >&2
  rm -rf "$dir"
  python3 -m venv "$dir"
  "$dir/bin/python" -m pip install -q --disable-pip-version-check "$@"
  printf '%s' "$want" >"$stamp" # written last: a half-made venv is redone next time
}

make_venv "$ROOT/.venv-test/py10" "${PY10_REQS[@]}"
make_venv "$ROOT/.venv-test/py08" "${PY08_REQS[@]}"

export S4DB_TEST_PY10="$ROOT/.venv-test/py10/bin/python"
export S4DB_TEST_PY08="$ROOT/.venv-test/py08/bin/python"
export S4DB_MOTO_SERVER="$ROOT/.venv-test/py10/bin/moto_server"

if [[ $SETUP_ONLY -eq 1 ]]; then
  echo "test.sh: setup done"
  exit 0
fi

# ---- build and test
# Two test threads for the 2-core machine. Set through the environment rather than
# `-- --test-threads=2`: criterion bench binaries (run by --all-targets) reject that flag.
export RUST_TEST_THREADS="${RUST_TEST_THREADS:-2}"
cargo build --all-targets
cargo test --all-targets "$@"
# --all-targets leaves out the documentation examples; run them too.
if [[ $# -eq 0 ]]; then
  cargo test --doc
fi
