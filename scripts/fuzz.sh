#!/usr/bin/env bash
# Fuzz every parser of outside input for a bounded time (not part of the
# default test run; tests/fuzz_corpus.rs replays the kept corpus on stable).
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]     default: 60 s, every target
#
# Needs a nightly toolchain (`rustup toolchain install nightly`); installs
# cargo-fuzz if it is missing. New corpus entries land in fuzz/corpus/TARGET/
# (minimise with `cargo +nightly fuzz cmin TARGET` before committing); a crash
# is saved under fuzz/artifacts/TARGET/ and fails the run: fix it, then copy
# the input to fuzz/regressions/TARGET/ so the stable test keeps it fixed.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

secs=${1:-60}
shift || true
case $secs in
'' | *[!0-9]*)
	echo "usage: scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]" >&2
	exit 2
	;;
esac

if ! cargo +nightly --version >/dev/null 2>&1; then
	echo "fuzz.sh: needs a nightly toolchain: rustup toolchain install nightly" >&2
	exit 2
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
	echo "fuzz.sh: installing cargo-fuzz" >&2
	cargo install --locked cargo-fuzz
fi

if [ $# -gt 0 ]; then
	targets=("$@")
else
	mapfile -t targets < <(cargo +nightly fuzz list)
fi

# AddressSanitizer by default; fall back to no sanitizer where it cannot
# build (the parsers are safe Rust, so ASan mostly guards the C deps).
sanitizer=()
if ! cargo +nightly fuzz build -O -a "${targets[0]}" >/dev/null 2>&1; then
	echo "fuzz.sh: AddressSanitizer build failed: fuzzing with -s none (no sanitizer)" >&2
	sanitizer=(-s none)
fi

summary=()
failed=0
for t in "${targets[@]}"; do
	mkdir -p "corpus/$t"
	log=$(mktemp)
	echo "== $t: ${secs}s"
	# -a: debug assertions and overflow checks on (an overflow is a bug too).
	if cargo +nightly fuzz run "${sanitizer[@]}" -O -a "$t" -- \
		-max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
		>"$log" 2>&1; then
		status=ok
	else
		status=CRASH
		failed=1
		tail -n 60 "$log"
	fi
	runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1 || true)
	cov=$(grep -oE '#[0-9]+[[:space:]]+(DONE|INITED).* cov: [0-9]+ ft: [0-9]+' "$log" | tail -1 | grep -oE 'cov: [0-9]+ ft: [0-9]+' || true)
	summary+=("$(printf '%-14s %-6s %10s execs  %s' "$t" "$status" "${runs:-?}" "${cov:-}")")
	rm -f "$log"
done

echo
echo "fuzz summary (${secs}s per target${sanitizer:+, no sanitizer}):"
printf '  %s\n' "${summary[@]}"
if [ $failed -ne 0 ]; then
	echo "crash inputs: fuzz/artifacts/TARGET/ (reproduce: cargo +nightly fuzz run TARGET FILE)"
	exit 1
fi
