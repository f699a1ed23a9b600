#!/usr/bin/env bash
# Podman set-up for the container paths (README "In containers", tests/container.rs).
#
#   scripts/container.sh setup              podman, runc, debootstrap, fuse3 (apt-get when
#                                           missing); containers.conf; the base image
#   scripts/container.sh image [OPTIONS]    setup, then the s4db image from ./Containerfile
#       --bin-dir DIR    use the s4db and s4db-mount in DIR (default: cargo build --release,
#                        then target/release)
#       --tag NAME       image name (default localhost/s4db:latest)
#   scripts/container.sh env                prints `export CONTAINERS_CONF=...` (eval it)
#   scripts/container.sh podman ARGS...     podman with that containers.conf
#
# This machine cannot pull images, so the base image, localhost/s4db-base:bookworm, is a
# `debootstrap --variant=minbase bookworm` root filesystem (plus fuse3 and ca-certificates)
# imported with `podman import`, from the Debian mirror apt uses here. It is made once
# (about a minute) and kept; its recipe is in its label, so a changed recipe remakes it.
#
# containers.conf (target/container/containers.conf, pointed to by CONTAINERS_CONF):
# runc, because crun fails here ("hybrid cgroups"); explicit ulimits, because the default
# ones fail in runc's rlimit set-up ("error setting rlimit type 7: operation not
# permitted"). Podman's other defaults stand.
#
# Everything runs under one lock (target/container/lock), so concurrent test runs share
# one base image and one staging directory.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)
source "$ROOT/scripts/lib.sh"

WORK="$ROOT/target/container"
CONF="$WORK/containers.conf"
BASE_IMAGE="localhost/s4db-base:bookworm"
BASE_PACKAGES="fuse3,ca-certificates"
SUITE="bookworm"

usage() {
  sed -n '2,12p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
  exit 2
}

# The Debian mirror apt uses on this machine (deb822 or one-line sources), else deb.debian.org.
debian_mirror() {
  local uri
  uri=$(grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null |
    awk '{print $2}' | grep -v -- '-security' | grep -m1 '/debian/\?$' || true)
  if [[ -z "$uri" ]]; then
    uri=$(grep -hs '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null |
      awk '{print $2}' | grep -v -- '-security' | grep -m1 '/debian/\?$' || true)
  fi
  echo "${uri:-http://deb.debian.org/debian}"
}

write_conf() {
  mkdir -p "$WORK"
  local want
  want=$(printf '%s\n' \
    '# Written by scripts/container.sh: runc (crun fails here on hybrid cgroups) and' \
    '# explicit ulimits (the default ones fail in runc'"'"'s rlimit set-up here).' \
    '[containers]' \
    'default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]' \
    '' \
    '[engine]' \
    'runtime = "runc"')
  if [[ ! -f "$CONF" || "$(cat "$CONF")" != "$want" ]]; then
    printf '%s\n' "$want" >"$CONF.tmp" && mv "$CONF.tmp" "$CONF"
  fi
  export CONTAINERS_CONF="$CONF"
}

install_tools() {
  local missing=()
  command -v podman >/dev/null || missing+=(podman)
  command -v runc >/dev/null || missing+=(runc)
  command -v debootstrap >/dev/null || missing+=(debootstrap)
  command -v fusermount3 >/dev/null || missing+=(fuse3)
  if [[ ${#missing[@]} -gt 0 ]]; then apt_install "${missing[@]}" >&2; fi
}

# The base image, made with debootstrap unless an image with this recipe exists.
base_image() {
  local mirror recipe have dir
  mirror=$(debian_mirror)
  recipe="debootstrap --variant=minbase --include=$BASE_PACKAGES $SUITE"
  have=$(podman image inspect --format '{{index .Labels "s4db.base.recipe"}}' "$BASE_IMAGE" 2>/dev/null || true)
  if [[ "$have" == "$recipe" ]]; then
    return 0
  fi
  echo "container.sh: making $BASE_IMAGE ($recipe, from $mirror)" >&2
  dir=$(mktemp -d "${TMPDIR:-/tmp}/s4db-base-XXXXXX")
  # shellcheck disable=SC2064
  trap "rm -rf '$dir'" EXIT
  if ! debootstrap --variant=minbase --include="$BASE_PACKAGES" "$SUITE" "$dir" "$mirror" \
    >"$WORK/debootstrap.log" 2>&1; then
    tail -20 "$WORK/debootstrap.log" >&2
    echo "container.sh: debootstrap failed; full log in $WORK/debootstrap.log" >&2
    exit 1
  fi
  # An image needs neither the downloaded packages nor the package lists.
  rm -rf "$dir"/var/cache/apt/archives/*.deb "$dir"/var/lib/apt/lists/*
  tar -C "$dir" -c . | podman import -q \
    --change "LABEL s4db.base.recipe=\"$recipe\"" \
    --change 'CMD ["/bin/bash"]' \
    - "$BASE_IMAGE" >/dev/null
  rm -rf "$dir"
  trap - EXIT
  echo "container.sh: $BASE_IMAGE ready" >&2
}

setup() {
  install_tools
  write_conf
  base_image
}

# image [--bin-dir DIR] [--tag NAME]: the s4db image from the binaries in DIR.
image() {
  local bin_dir="" tag="localhost/s4db:latest"
  while [[ $# -gt 0 ]]; do
    case "$1" in
      --bin-dir) bin_dir=$2; shift 2 ;;
      --tag) tag=$2; shift 2 ;;
      *) usage ;;
    esac
  done
  if [[ -z "$bin_dir" ]]; then
    cargo build --release --bin s4db --bin s4db-mount
    bin_dir="${CARGO_TARGET_DIR:-$ROOT/target}/release"
  fi
  for b in s4db s4db-mount; do
    [[ -x "$bin_dir/$b" ]] || { echo "container.sh: no $bin_dir/$b" >&2; exit 1; }
  done
  setup
  # The one part of target/ that .containerignore lets into the build context.
  rm -rf "$WORK/bin"
  mkdir -p "$WORK/bin"
  cp -l "$bin_dir/s4db" "$bin_dir/s4db-mount" "$WORK/bin/" 2>/dev/null ||
    cp "$bin_dir/s4db" "$bin_dir/s4db-mount" "$WORK/bin/"
  local id
  id=$(podman build --network=none -q -t "$tag" -f "$ROOT/Containerfile" \
    --build-arg PREBUILT=target/container/bin "$ROOT")
  # The builder stage and earlier builds of this tag leave unnamed images behind; those of
  # the last hour stay, as a concurrent test run may still be using one.
  podman image prune -f --filter until=1h >/dev/null
  echo "container.sh: $tag built from $bin_dir" >&2
  # The image's id, for callers that must not see a later build retag $tag.
  echo "# image $tag is ${id##*$'\n'}"
}

cmd=${1:-}
[[ $# -gt 0 ]] && shift
mkdir -p "$WORK"
case "$cmd" in
  setup | image)
    exec 9>"$WORK/lock"
    flock 9
    "$cmd" "$@"
    echo "export CONTAINERS_CONF=$CONF"
    ;;
  env)
    write_conf
    echo "export CONTAINERS_CONF=$CONF"
    ;;
  podman)
    write_conf
    exec podman "$@"
    ;;
  *) usage ;;
esac
