#!/usr/bin/env bash
# Where the CPU time goes, in one command: samples (perf record, call graphs) of the scoring path
# (top-100 of 20,000 users at 20k items, int8 and exact serving copies) and of training steps
# (3,600 items, the paper's layer sizes), and writes a summary of each (the functions taking the
# most samples, self time) under docs/profiles/ (or $1), plus a flame graph SVG of each when
# inferno (`cargo install inferno`) is on the PATH. With KAFKA_BROKERS set, also a serving replica
# (`--role serve`, a 20k-item model) for 20 s of a 1k clicks/s load (`bench fleet --latency-items`):
# the whole serving path, threads included. Needs Linux perf (Debian: linux-perf).
#   [KAFKA_BROKERS=host:port] scripts/profile.sh [OUT_DIR]
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

by_symbol() { # perf data file
  echo "Self time by function (perf report --no-children --sort symbol), top 30:"
  echo
  perf report -i "$1" --no-children --sort symbol --stdio -g none 2>/dev/null \
    | grep -E '^ +[0-9.]+%' | awk 'NR <= 30' | sed -E 's/[ -]+$//'
}

by_thread() { # perf data file
  echo "Samples by thread (perf report --sort comm), top 12:"
  echo
  perf report -i "$1" --no-children --sort comm --stdio -g none 2>/dev/null \
    | grep -E '^ +[0-9.]+%' | awk 'NR <= 12' | sed -E 's/[ -]+$//'
}

flame() { # perf data file, svg
  if command -v inferno-collapse-perf >/dev/null && command -v inferno-flamegraph >/dev/null; then
    perf script -i "$1" 2>/dev/null | inferno-collapse-perf | inferno-flamegraph > "$2"
  fi
}

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
    by_symbol "$work/$name.data"
  } > "$out/$name.txt"
  flame "$work/$name.data" "$out/$name.svg"
  echo "$out/$name.txt"
}

profile scoring --items 20000 --steps 0 --score-users 20000
profile training --items 3600 --steps 40 --score-users 1

profile_replica() {
  local log=$work/replica.log
  "$bench" fleet --brokers "$KAFKA_BROKERS" --latency-items 20000 --rates 1000 --seconds 30 \
    --work-dir "$work/fleet" > "$log" 2>&1 &
  local runner=$! replica=
  until grep -q "a model over 20000 items served" "$log"; do
    kill -0 "$runner" 2>/dev/null || { cat "$log" >&2; exit 1; }
    sleep 1
  done
  sleep 4 # into the load
  for p in $(pgrep -P "$runner"); do
    tr '\0' '\n' < "/proc/$p/environ" 2>/dev/null | grep -qx "MULTIVAED_ROLE=serve" && replica=$p
  done
  [ -n "$replica" ] || { echo "no serving replica found" >&2; exit 1; }
  perf record -F 999 -g -p "$replica" -o "$work/replica.data" -- sleep 20 2> /dev/null
  wait "$runner"
  {
    echo "# replica: a serving replica under multivaed-bench fleet --latency-items 20000 --rates 1000 (20 s of the load)"
    echo "# $(date -u +%F), $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
    echo
    grep -E "fleet latency at|  stage" "$log" || true
    echo
    by_thread "$work/replica.data"
    echo
    by_symbol "$work/replica.data"
  } > "$out/replica.txt"
  flame "$work/replica.data" "$out/replica.svg"
  echo "$out/replica.txt"
}

if [ -n "${KAFKA_BROKERS:-}" ]; then
  profile_replica
fi
