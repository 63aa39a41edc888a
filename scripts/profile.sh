#!/usr/bin/env bash
# Where the CPU time goes, in one command: samples (perf record, call graphs) of the scoring path
# (top-100 of 20,000 users at 20k items, int8 and exact serving copies) and of training steps
# (3,600 items, the paper's layer sizes), and writes a summary of each (the functions taking the
# most samples, self time) under docs/profiles/ (or $1), plus a flame graph SVG of each when
# inferno (`cargo install inferno`) is on the PATH. Needs Linux perf (Debian: linux-perf).
#   scripts/profile.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-docs/profiles}
mkdir -p "$out"
command -v perf >/dev/null || { echo "perf is not installed (Debian: apt-get install linux-perf)" >&2; exit 1; }
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/tmp/multivaed-target}
cargo build --release --workspace
bench=$CARGO_TARGET_DIR/release/multivaed-bench
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

profile() { # name, then the benchmark's arguments
  local name=$1; shift
  perf record -F 499 -g -o "$work/$name.data" -- "$bench" model --threads 2 --dense-at 0 "$@" \
    > "$work/$name.table" 2> "$work/$name.log"
  {
    echo "# $name: multivaed-bench model $*"
    echo "# $(date -u +%F), $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
    echo
    grep '^|' "$work/$name.table" || true
    echo
    echo "Self time by function (perf report --no-children --sort symbol), top 30:"
    echo
    perf report -i "$work/$name.data" --no-children --sort symbol --stdio -g none 2>/dev/null \
      | grep -E '^ +[0-9.]+%' | awk 'NR <= 30' | sed -E 's/[ -]+$//'
  } > "$out/$name.txt"
  if command -v inferno-collapse-perf >/dev/null && command -v inferno-flamegraph >/dev/null; then
    perf script -i "$work/$name.data" 2>/dev/null | inferno-collapse-perf | inferno-flamegraph > "$out/$name.svg"
  fi
  echo "$out/$name.txt"
}

profile scoring --items 20000 --steps 0 --score-users 20000
profile training --items 3600 --steps 40 --score-users 1
