#!/usr/bin/env bash
# Sets up qemubox in this checkout: Debian packages (when root), .venv with qemubox
# installed editable. Idempotent; fast when everything is already in place.
#   ./setup.sh          runtime only
#   ./setup.sh --dev    also test tools and the extra kernel sources the tests use
set -euo pipefail
cd "$(dirname "$0")"

dev=0
for arg in "$@"; do
  case "$arg" in
    --dev) dev=1 ;;
    -h|--help) sed -n '2,6p' "$0"; exit 0 ;;
    *) echo "setup.sh: unknown option: $arg" >&2; exit 2 ;;
  esac
done

# Debian packages qemubox drives: QEMU, the guest userland, disk and root images (Debian's and
# container images'), kernel sources and what it takes to build a kernel.
pkgs=(qemu-system-x86 qemu-utils busybox-static e2fsprogs cpio kmod xz-utils zstd
      linux-source-6.12 build-essential flex bison bc libelf-dev libssl-dev libncurses-dev
      python3-venv ca-certificates debootstrap openssh-client skopeo umoci buildah)
if [ "$dev" = 1 ]; then
  # The --explain tests run against a second kernel generation too; the arm64 cross build
  # is booted on QEMU's virt machine; every other architecture boots once (its QEMU, and
  # the cross compiler its guest agent is built with; riscv64's kernel too).
  pkgs+=(linux-source-6.1 gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-system-arm procps
         qemu-system-ppc qemu-system-mips qemu-system-misc
         gcc-arm-linux-gnueabihf libc6-dev-armhf-cross gcc-i686-linux-gnu libc6-dev-i386-cross
         gcc-powerpc64le-linux-gnu libc6-dev-ppc64el-cross gcc-s390x-linux-gnu
         libc6-dev-s390x-cross gcc-riscv64-linux-gnu libc6-dev-riscv64-cross
         gcc-mips64el-linux-gnuabi64 libc6-dev-mips64el-cross openssl)
fi

# The serve tests drive E2B's JavaScript SDK through node and npm (where the machine has
# no npm of its own, Debian's).
if [ "$dev" = 1 ] && ! command -v npm >/dev/null; then
  pkgs+=(nodejs npm)
fi

missing=()
for p in "${pkgs[@]}"; do
  status=$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)
  [ "$status" = "install ok installed" ] || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "setup: installing ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "setup: missing Debian packages; run as root:" >&2
    echo "  apt-get install --no-install-recommends ${missing[*]}" >&2
    exit 1
  fi
fi

# qemubox fetches Debian's kernel package with apt-get download: it needs package lists.
if [ "$(id -u)" = 0 ] && ! ls /var/lib/apt/lists/*_Packages >/dev/null 2>&1; then
  apt-get update -qq
fi

py=${PYTHON:-python3}
if ! "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "setup: qemubox needs Python >= 3.11 (found: $("$py" --version 2>&1))" >&2
  exit 1
fi

extras=""
[ "$dev" = 1 ] && extras="[dev]"
stamp_want="$(sha256sum pyproject.toml | cut -d' ' -f1)$extras"
if [ ! -x .venv/bin/python ]; then
  "$py" -m venv .venv
fi
if [ "$(cat .venv/.qemubox-stamp 2>/dev/null || true)" != "$stamp_want" ]; then
  .venv/bin/python -m pip install -q --disable-pip-version-check -e ".$extras"
  echo "$stamp_want" > .venv/.qemubox-stamp
fi
