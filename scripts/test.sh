#!/usr/bin/env bash
# The test command: installs the deployment tools (scripts/tools.sh: promtool/prometheus,
# systemd-analyze, kubernetes-validate, hadolint), starts a real Kafka-protocol broker
# (scripts/kafka.sh) unless KAFKA_BROKERS already names one, runs the whole test suite against
# them, and stops the broker on every exit.
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(bash scripts/tools.sh)"
if [ -z "${KAFKA_BROKERS:-}" ]; then
  export KAFKA_PORT=${KAFKA_PORT:-19092}
  trap 'scripts/kafka.sh stop' EXIT
  scripts/kafka.sh start
  export KAFKA_BROKERS=127.0.0.1:$KAFKA_PORT
fi
cargo test --workspace --all-targets "$@"
