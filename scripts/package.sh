#!/usr/bin/env bash
# Build the Debian package (vxmesh_VERSION_ARCH.deb) into target/debian/.
#
#   scripts/package.sh                  release build, then the package
#   scripts/package.sh --dev [--output DIR]
#                                       package the debug binary already built
#                                       (target/debug/vxmesh) with fast
#                                       compression: what the CI test does
#
# Man pages and shell completions are generated from the binary first
# (`vxmesh man DIR`, `vxmesh completions SHELL`) into
# TARGET/PROFILE/vxmesh-assets/, where [package.metadata.deb] in
# crates/vxmesh-cli/Cargo.toml takes them from. cargo-deb is installed
# when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
CARGO_DEB_VERSION=3.8.0
profile=release
output=()
while [ $# -gt 0 ]; do
  case "$1" in
    --dev) profile=dev ;;
    --output) output=(--output "$2"); shift ;;
    *) echo "usage: scripts/package.sh [--dev] [--output DIR]" >&2; exit 2 ;;
  esac
  shift
done

if ! cargo deb --version >/dev/null 2>&1; then
  echo "installing cargo-deb $CARGO_DEB_VERSION"
  cargo install cargo-deb --version "$CARGO_DEB_VERSION" --locked
fi

target_dir=$(cargo metadata --no-deps --format-version 1 \
  | grep -o '"target_directory":"[^"]*"' | cut -d'"' -f4)
if [ "$profile" = release ]; then
  cargo build --release -p vxmesh-cli --bin vxmesh
  out_dir="$target_dir/release"
  deb_args=()
else
  out_dir="$target_dir/debug"
  # cargo-deb warns that it is meant for release builds: this package is a
  # test of the packaging, not a release.
  deb_args=(--profile dev --fast)
fi
bin="$out_dir/vxmesh"
[ -x "$bin" ] || { echo "no $bin: build it first (cargo build)" >&2; exit 1; }

assets="$out_dir/vxmesh-assets"
rm -rf "$assets"
mkdir -p "$assets/completions"
"$bin" man "$assets/man"
gzip -9n "$assets"/man/*.1          # Debian ships man pages compressed
"$bin" completions bash >"$assets/completions/vxmesh.bash"
"$bin" completions zsh >"$assets/completions/_vxmesh"
"$bin" completions fish >"$assets/completions/vxmesh.fish"

cargo deb -p vxmesh-cli --no-build "${deb_args[@]}" "${output[@]}"
