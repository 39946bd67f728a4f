#!/usr/bin/env bash
# The whole test suite (as root): unit, property and namespace/lab tests.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
# A full run builds everything once: incremental caches would only double
# the target directory's size on disk.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
cargo build --quiet --bins
cargo test --all-targets --no-fail-fast -- --test-threads=2
