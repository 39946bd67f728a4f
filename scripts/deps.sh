#!/usr/bin/env bash
# Install the system packages vxmesh's build, tests and lab need (Debian).
# Idempotent: installs only what is missing.
set -euo pipefail
pkgs=()
command -v ip >/dev/null 2>&1 || pkgs+=(iproute2)        # inspection in tests only
command -v nsenter >/dev/null 2>&1 || pkgs+=(util-linux)
command -v cc >/dev/null 2>&1 || pkgs+=(gcc)
command -v podman >/dev/null 2>&1 || pkgs+=(podman)    # tests/podman.rs: a real CNI runtime
command -v runc >/dev/null 2>&1 || pkgs+=(runc)
dpkg -s busybox-static >/dev/null 2>&1 || pkgs+=(busybox-static)  # the locally built test image
[ -x /usr/sbin/dockerd ] || pkgs+=(docker.io)          # lab --runtime docker, tests/docker.rs: Debian's dockerd 20.10
command -v etcd >/dev/null 2>&1 || pkgs+=(etcd-server)   # the etcd store: lab --store etcd, tests
[ -x /usr/bin/etcdctl ] || pkgs+=(etcd-client)            # fault harness: etcd snapshot save/restore
command -v nft >/dev/null 2>&1 || pkgs+=(nftables)       # the agent's table inet vxmesh; fault harness partitions
command -v iptables-nft >/dev/null 2>&1 || pkgs+=(iptables)  # tests/firewall: coexistence with iptables-nft tables
command -v protoc >/dev/null 2>&1 || pkgs+=(protobuf-compiler)  # etcd-client compiles protobufs
command -v openssl >/dev/null 2>&1 || pkgs+=(openssl)    # throwaway certificates of the etcd TLS tests
command -v chattr >/dev/null 2>&1 || pkgs+=(e2fsprogs)     # tests/cni_conformance: a GC release that fails
[ -x /usr/bin/iperf3 ] || pkgs+=(iperf3)                  # bench throughput (and its smoke test)
command -v systemd-analyze >/dev/null 2>&1 || pkgs+=(systemd)   # tests/packaging.rs: verify the unit
command -v man >/dev/null 2>&1 || pkgs+=(man-db)         # tests/packaging.rs: the man pages render
command -v dpkg-deb >/dev/null 2>&1 || pkgs+=(dpkg)       # scripts/package.sh, tests/packaging.rs
[ -x /usr/lib/cni/bridge ] && [ -x /usr/lib/cni/host-local ] && [ -x /usr/lib/cni/portmap ] \
  && [ -x /usr/lib/cni/tuning ] && [ -x /usr/lib/cni/firewall ] \
  || pkgs+=(containernetworking-plugins)                 # bench cni, tests/podman_ports: the reference plugins
command -v iptables >/dev/null 2>&1 || pkgs+=(iptables)  # tests/podman_ports: portmap and firewall use it
if [ ${#pkgs[@]} -gt 0 ]; then
  echo "installing: ${pkgs[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${pkgs[@]}"
fi
if ! command -v cargo >/dev/null 2>&1; then
  echo "vxmesh needs a Rust toolchain (1.89 or newer, e.g. from rustup)" >&2
  exit 1
fi
# scripts/package.sh builds the Debian package with cargo-deb (and installs
# it the same way when missing); the packaging test runs that script.
if ! cargo deb --version >/dev/null 2>&1; then
  echo "installing cargo-deb"
  cargo install cargo-deb --version 3.8.0 --locked
fi
