#!/usr/bin/env bash
# Fuzzes the click-event parser (fuzz/fuzz_targets/parse_event.rs) for SECONDS (default 60),
# starting from the corpus kept in fuzz/corpus/parse_event (new finds are added there).
# Installs cargo-fuzz 0.13.2 once. Runs on the stable toolchain (no sanitizer: the parser is safe
# Rust; the fuzzer looks for panics and broken invariants). A crash leaves its input in
# fuzz/artifacts/parse_event/ and fails the script.
#   scripts/fuzz.sh [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
secs=${1:-60}
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked --version 0.13.2
export CARGO_TARGET_DIR=${CARGO_FUZZ_TARGET_DIR:-/var/tmp/multivaed-fuzz-target}
log=$(mktemp)
if ! cargo fuzz run -s none parse_event corpus/parse_event -- -max_total_time="$secs" -print_final_stats=1 >"$log" 2>&1; then
  tail -n 40 "$log"; echo "fuzzing found a failure (input in fuzz/artifacts/parse_event/)" >&2; exit 1
fi
grep -E "^(Done|stat::number_of_executed_units|stat::peak_rss_mb)" "$log"
