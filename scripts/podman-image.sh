#!/usr/bin/env bash
# Build a tiny container image (a rootfs tarball) from Debian's static busybox,
# for machines that cannot reach any registry. Import it with
#   podman import OUT.tar localhost/vxm-busybox:latest
# Usage: scripts/podman-image.sh OUT.tar   (needs busybox-static)
set -euo pipefail
out=${1:?usage: $0 OUT.tar}
bb=${BUSYBOX:-/bin/busybox}
if [ ! -x "$bb" ]; then
  echo "podman-image: $bb is missing: install busybox-static (scripts/deps.sh)" >&2
  exit 1
fi
# The image has no libc: the binary must be static.
if ldd "$bb" >/dev/null 2>&1; then
  echo "podman-image: $bb is dynamically linked: install busybox-static, not busybox" >&2
  exit 1
fi
root=$(mktemp -d "${TMPDIR:-/tmp}/vxm-rootfs.XXXXXX")
trap 'rm -rf "$root"' EXIT
chmod 0755 "$root"
mkdir -p "$root"/{bin,dev,etc,proc,sys,tmp}
chmod 1777 "$root/tmp"
cp "$bb" "$root/bin/busybox"
for app in sh ping nc sleep ip cat ls echo hostname; do
  ln -s busybox "$root/bin/$app"
done
tar -C "$root" --owner=0 --group=0 --numeric-owner -cf "$out" .
