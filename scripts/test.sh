#!/usr/bin/env bash
# The test command: installs the deployment tools (scripts/tools.sh: promtool/prometheus,
# systemd-analyze, kubernetes-validate, hadolint), starts Apache Kafka (scripts/kafka.sh: fetched
# once from Maven Central; needs Java 17+ and Maven) unless KAFKA_BROKERS already names a broker
# (then KAFKA_SASL_BROKERS and KAFKA_CA_FILE name its SASL_SSL listener for the security tests),
# runs the whole test suite against it, and stops the broker on every exit.
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(bash scripts/tools.sh)"
if [ -z "${KAFKA_BROKERS:-}" ]; then
  export KAFKA_PORT=${KAFKA_PORT:-19092}
  trap 'scripts/kafka.sh stop' EXIT
  scripts/kafka.sh start
  export KAFKA_BROKERS=127.0.0.1:$KAFKA_PORT
  # the same broker's SASL_SSL listener (SCRAM-SHA-512 over TLS) for the security tests
  export KAFKA_SASL_BROKERS=127.0.0.1:$(scripts/kafka.sh sasl-port)
  export KAFKA_CA_FILE=$(scripts/kafka.sh ca)
fi
cargo test --workspace --all-targets "$@"
