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
