#!/usr/bin/env bash
# The test broker: Apache Kafka (KRaft, one node that is broker and controller) on
# 127.0.0.1:${KAFKA_PORT:-9092}. The broker is the jars of org.apache.kafka:kafka_2.13 and its
# runtime dependencies, fetched once from Maven Central with Maven (scripts/kafka/pom.xml, versions
# pinned) into $MULTIVAED_TOOLS/kafka-<version>/; its storage is formatted afresh at each start
# with Kafka's own StorageTool; it logs to $MULTIVAED_TOOLS/kafka-$KAFKA_PORT/broker.log.
# Needs Java 17+ and Maven.
#   scripts/kafka.sh start   -> starts it in the background, waits until it answers metadata
#   scripts/kafka.sh stop    -> stops it
#   scripts/kafka.sh topic NAME PARTITIONS [key=value ...]   (topic configs, e.g. cleanup.policy=compact)
#   scripts/kafka.sh user NAME PASSWORD     -> a SCRAM-SHA-512 user of the SASL_SSL listener
#   scripts/kafka.sh acl PRINCIPAL OPERATION TOPIC|GROUP|TRANSACTIONAL_ID|CLUSTER NAME [prefixed]
#   scripts/kafka.sh ca | sasl-port         -> the CA certificate's path, the SASL_SSL port
# The plaintext listener's clients may do anything; a SASL user only what ACLs allow it.
#   scripts/kafka.sh libs    -> installs the broker's jars and prints their directory
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
port=${KAFKA_PORT:-9092}
controller_port=$((port + 1000))
# the SASL_SSL listener (SCRAM-SHA-512 over TLS; its CA certificate in $run/ca.pem)
sasl_port=${KAFKA_SASL_PORT:-$((port + 2000))}
home=${MULTIVAED_TOOLS:-/var/tmp/multivaed-tools}
version=$(grep -A1 '<artifactId>kafka_2.13</artifactId>' "$here/kafka/pom.xml" | sed -n 's:.*<version>\(.*\)</version>.*:\1:p')
libs=$home/kafka-$version/libs
run=$home/kafka-$port
pidfile=$run/broker.pid
log=$run/broker.log
heap=${KAFKA_HEAP:-768m}

need() {
  local missing=()
  command -v java >/dev/null || missing+=("Java 17 or newer (java)")
  command -v mvn >/dev/null || [ -f "$libs/.complete" ] || missing+=("Maven (mvn)")
  if [ ${#missing[@]} -gt 0 ]; then
    echo "scripts/kafka.sh: the test broker (Apache Kafka $version) needs ${missing[*]} on PATH" >&2
    exit 1
  fi
  local java_major
  java_major=$(java -XshowSettings:properties -version 2>&1 | sed -n 's/^ *java.specification.version = //p')
  if [ "${java_major%%.*}" -lt 17 ] 2>/dev/null; then
    echo "scripts/kafka.sh: Apache Kafka $version needs Java 17 or newer; java is $java_major" >&2
    exit 1
  fi
}

install_broker() {
  [ -f "$libs/.complete" ] && return 0
  echo "fetching Apache Kafka $version from Maven Central into $libs" >&2
  rm -rf "$libs"
  mkdir -p "$libs"
  mvn -q -B -Dstyle.color=never -f "$here/kafka/pom.xml" dependency:copy-dependencies \
    -DincludeScope=runtime -DoutputDirectory="$libs" >&2
  touch "$libs/.complete"
}

storepass=test-broker-keystore

# A self-signed certificate for 127.0.0.1 (the broker's TLS key), made with the JDK's keytool;
# clients trust it through $run/ca.pem.
make_certificate() {
  keytool -genkeypair -alias broker -keyalg RSA -keysize 2048 -validity 3650 \
    -dname "CN=127.0.0.1" -ext "SAN=ip:127.0.0.1,dns:localhost" -storetype PKCS12 \
    -keystore "$run/broker.p12" -storepass "$storepass" -keypass "$storepass" >/dev/null 2>&1
  keytool -exportcert -rfc -alias broker -keystore "$run/broker.p12" -storepass "$storepass" \
    -file "$run/ca.pem" >/dev/null 2>&1
}

admin() {
  java -cp "$libs/*" "$here/kafka/Admin.java" "$@"
}

wait_ready() {
  for _ in $(seq 1 120); do
    if ! kill -0 "$(cat "$pidfile")" 2>/dev/null; then
      echo "the broker exited; its log:" >&2; tail -50 "$log" >&2; return 1
    fi
    if admin ready "127.0.0.1:$port" >/dev/null 2>&1; then return 0; fi
    sleep 0.5
  done
  echo "the broker did not answer metadata on port $port within 60 s; its log:" >&2
  tail -50 "$log" >&2
  return 1
}

start() {
  need
  install_broker
  if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
    echo "broker already running (pid $(cat "$pidfile"))"; return 0
  fi
  rm -rf "$run"
  mkdir -p "$run/data"
  make_certificate
  sed -e "s|@PORT@|$port|g" -e "s|@CONTROLLER_PORT@|$controller_port|g" -e "s|@DATA@|$run/data|g" \
    -e "s|@SASL_PORT@|$sasl_port|g" -e "s|@RUN@|$run|g" -e "s|@STOREPASS@|$storepass|g" \
    "$here/kafka/server.properties" >"$run/server.properties"
  local id
  id=$(java -cp "$libs/*" kafka.tools.StorageTool random-uuid 2>/dev/null | tail -1)
  java -cp "$libs/*" -Dlog4j2.configurationFile="$here/kafka/log4j2.properties" -Dkafka.log.file="$log" \
    kafka.tools.StorageTool format -t "$id" -c "$run/server.properties" >"$run/format.log" 2>&1 \
    || { cat "$run/format.log" >&2; return 1; }
  nohup java -Xms256m -Xmx"$heap" -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:TieredStopAtLevel=1 \
    -Dlog4j2.configurationFile="$here/kafka/log4j2.properties" -Dkafka.log.file="$log" \
    -cp "$libs/*" kafka.Kafka "$run/server.properties" >"$run/stdout.log" 2>&1 &
  echo $! >"$pidfile"
  wait_ready
  echo "Apache Kafka $version on 127.0.0.1:$port, SASL_SSL (SCRAM-SHA-512) on 127.0.0.1:$sasl_port (CA $run/ca.pem) (pid $(cat "$pidfile"), log $log)"
}

stop() {
  [ -f "$pidfile" ] || return 0
  local pid
  pid=$(cat "$pidfile")
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null || true
  rm -f "$pidfile"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  topic) shift; need; install_broker; admin topic "127.0.0.1:$port" "$@" ;;
  user) shift; need; install_broker; admin user "127.0.0.1:$port" "$@" ;;
  acl) shift; need; install_broker; admin acl "127.0.0.1:$port" "$@" ;;
  ca) echo "$run/ca.pem" ;;
  sasl-port) echo "$sasl_port" ;;
  libs) need; install_broker; echo "$libs" ;;
  *) echo "usage: $0 start|stop|topic NAME PARTITIONS [key=value ...]|user NAME PASSWORD|acl PRINCIPAL OPERATION TYPE NAME [prefixed]|ca|sasl-port|libs" >&2; exit 2 ;;
esac
