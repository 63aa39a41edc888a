#!/usr/bin/env bash
# The benchmark suite in one command: builds the release binary, starts a real Kafka-protocol
# broker (scripts/kafka.sh, port 19093) unless KAFKA_BROKERS names one, and runs
# `multivaed bench suite`: ingest vs raw consume, click-to-recommendation latency at 1k and 5k
# clicks/s with a 20k-item model, training step and scoring at 20k/100k items, training epochs on
# MovieLens-100K and Gowalla beside the PyTorch reference, peak RSS of each. Writes
# bench-out/report.json and bench-out/report.md and prints the tables.
#   scripts/bench.sh [--quick] [--out DIR] [--threads N] [--ml100k-split DIR] [--gowalla FILE]
# REF_PYTHON=/path/to/python (with torch, see ../shared/REFERENCE.md) adds the PyTorch columns.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --workspace   # multivaed and multivaed-bench (kit/), side by side
bin=${CARGO_TARGET_DIR:-target}/release/multivaed
if [ -z "${KAFKA_BROKERS:-}" ]; then
  export KAFKA_PORT=${BENCH_KAFKA_PORT:-19093}
  trap 'scripts/kafka.sh stop' EXIT
  scripts/kafka.sh start
  export KAFKA_BROKERS=127.0.0.1:$KAFKA_PORT
fi
"$bin" bench suite --brokers "$KAFKA_BROKERS" "$@"
