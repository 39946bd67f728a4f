#!/usr/bin/env bash
# Install what is needed, build vxmesh and run the lab demo (as root).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
cargo build --release --quiet
exec ./target/release/vxmesh lab demo "$@"
