# Shell helpers shared by scripts/*.sh (sourced, never run on its own).

# apt_install PKG...: Debian packages, with one `apt-get update` per script run;
# through sudo when not root.
SUDO=""
if [[ $(id -u) -ne 0 ]] && command -v sudo >/dev/null; then SUDO="sudo"; fi
APT_UPDATED=0
apt_install() {
  if [[ $APT_UPDATED -eq 0 ]]; then
    $SUDO apt-get update -q
    APT_UPDATED=1
  fi
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@"
}

# bench_setup: sets PY and MOTO_SERVER (the test venv, made when missing) and
# BIN (S4DB_BENCH_BIN, else a fresh release build) for the mount benchmarks.
bench_setup() {
  PY="$ROOT/.venv-test/py10/bin/python"
  MOTO_SERVER="${S4DB_MOTO_SERVER:-$ROOT/.venv-test/py10/bin/moto_server}"
  [[ -x "$PY" && -x "$MOTO_SERVER" ]] || "$ROOT/scripts/test.sh" --setup-only
  if [[ -n "${S4DB_BENCH_BIN:-}" ]]; then
    BIN="$S4DB_BENCH_BIN"
  else
    cargo build --release --bins -q
    BIN="$ROOT/target/release"
  fi
}

# bench_cleanup: the mount benchmarks' exit trap: unmounts $MNT, stops the
# moto_server start_moto started, removes $WORK.
bench_cleanup() {
  fusermount3 -uz "$MNT" 2>/dev/null || true
  [[ -z "${MOTO_PID:-}" ]] || kill "$MOTO_PID" 2>/dev/null || true
  rm -rf "$WORK"
}

# start_moto LOG: a moto_server on a free loopback port (after bench_setup),
# its output in LOG; sets MOTO_PID (bench_cleanup stops it) and
# ENDPOINT, exports what every S3 client here needs (dummy credentials, no
# profile, config or CA bundle) and creates the bucket "bench".
start_moto() {
  local port
  port=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  "$MOTO_SERVER" -H 127.0.0.1 -p "$port" >"$1" 2>&1 &
  MOTO_PID=$!
  export AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=bench AWS_REGION=us-east-1
  export AWS_CONFIG_FILE=/nonexistent AWS_SHARED_CREDENTIALS_FILE=/nonexistent
  unset AWS_CA_BUNDLE AWS_PROFILE
  ENDPOINT="http://127.0.0.1:$port"
  for _ in $(seq 50); do
    "$PY" -c "import urllib.request; urllib.request.urlopen('$ENDPOINT')" 2>/dev/null && break
    sleep 0.2
  done
  "$PY" -c "import boto3; boto3.client('s3', endpoint_url='$ENDPOINT').create_bucket(Bucket='bench')"
}

# stop_pids PID...: stops each process newest (last) first, so a daemon goes before the
# proxy and the server it still talks to while it stops: SIGTERM, up to 5 s, then SIGKILL.
stop_pids() {
  local i pid args=("$@")
  for ((i = ${#args[@]} - 1; i >= 0; i--)); do
    pid=${args[i]}
    kill "$pid" 2>/dev/null
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null
  done
  return 0
}
