#!/usr/bin/env bash
# The whole test suite (as root): unit, property and namespace/lab tests.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
cargo build --quiet --bins
cargo test --all-targets --no-fail-fast -- --test-threads=2
