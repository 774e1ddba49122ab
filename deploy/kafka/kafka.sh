#!/usr/bin/env bash
# Local single-node Apache Kafka 4.x broker (KRaft, combined broker+controller, no ZooKeeper),
# run from jars resolved from Maven Central by deploy/kafka/pom.xml. For tests, CI and local use.
#
# Usage: kafka.sh fetch | up | down [--purge] | status
#   fetch          copy the broker jars into $LIGHTMEM_KAFKA_HOME/libs (no-op when already there)
#   up             fetch if needed, format storage if needed, start the broker in the background,
#                  wait until it answers (<= LIGHTMEM_KAFKA_START_TIMEOUT s, default 90); idempotent
#   down [--purge] stop the broker (SIGTERM, SIGKILL after 20 s); --purge also deletes the data dir
#   status         exit 0 if the broker is running, 1 if not
#
# Environment:
#   LIGHTMEM_KAFKA_HOME             jar cache          (default $HOME/.cache/lightmem/kafka)
#   LIGHTMEM_KAFKA_DATA             data/run dir       (default $HOME/.cache/lightmem/kafka-data)
#                                   holds logs/ (Kafka log.dirs), server.properties, log4j2.properties,
#                                   kafka.pid, server.log (broker log), kafka.out (JVM stdout/stderr)
#   LIGHTMEM_KAFKA_PORT             client listener    (default 9092, always on 127.0.0.1)
#   LIGHTMEM_KAFKA_CONTROLLER_PORT  KRaft controller   (default 9093, always on 127.0.0.1)
#   LIGHTMEM_KAFKA_HEAP             JVM -Xmx           (default 512m)
#   LIGHTMEM_KAFKA_JAVA_OPTS        extra JVM options  (default empty)
#   LIGHTMEM_KAFKA_START_TIMEOUT    seconds `up` waits (default 90)
#   JAVA_HOME                       java to use (else `java` on PATH); Java 17+ is required
#   MVN                             maven command      (default mvn)
set -euo pipefail

SCRIPT_DIR="$(cd -- "$(dirname -- "$(readlink -f -- "${BASH_SOURCE[0]}")")" && pwd -P)"
POM="$SCRIPT_DIR/pom.xml"

KHOME="${LIGHTMEM_KAFKA_HOME:-$HOME/.cache/lightmem/kafka}"
DATA="${LIGHTMEM_KAFKA_DATA:-$HOME/.cache/lightmem/kafka-data}"
PORT="${LIGHTMEM_KAFKA_PORT:-9092}"
CPORT="${LIGHTMEM_KAFKA_CONTROLLER_PORT:-9093}"
HEAP="${LIGHTMEM_KAFKA_HEAP:-512m}"
START_TIMEOUT="${LIGHTMEM_KAFKA_START_TIMEOUT:-90}"
HOST=127.0.0.1
NODE_ID=1

LIBS="$KHOME/libs"
MARKER="$LIBS/.lightmem-kafka-version"
PIDFILE="$DATA/kafka.pid"
LOGDIRS="$DATA/logs"
PROPS="$DATA/server.properties"
LOG4J="$DATA/log4j2.properties"
SERVER_LOG="$DATA/server.log"
OUT_LOG="$DATA/kafka.out"

die() { echo "kafka.sh: error: $*" >&2; exit 1; }
info() { echo "kafka.sh: $*"; }

usage() {
  sed -n 's/^# \{0,1\}//; 5,10p' "${BASH_SOURCE[0]}"
}

# --- helpers -----------------------------------------------------------------------------------

kafka_version() {
  local v
  v="$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$POM" | head -n1)"
  [[ -n "$v" ]] || die "cannot read <kafka.version> from $POM"
  echo "$v"
}

# Marker content: Kafka version plus a hash of the pom, so any pom change triggers a re-fetch.
marker_content() {
  echo "kafka=$(kafka_version) pom-sha256=$(sha256sum "$POM" | cut -d' ' -f1)"
}

check_port_var() {
  local name="$1" val="$2"
  if ! [[ "$val" =~ ^[0-9]+$ ]] || ((val < 1 || val > 65535)); then
    die "$name must be a TCP port, got '$val'"
  fi
}

find_java() {
  if [[ -n "${JAVA_HOME:-}" && -x "$JAVA_HOME/bin/java" ]]; then
    JAVA="$JAVA_HOME/bin/java"
  elif command -v java >/dev/null 2>&1; then
    JAVA="$(command -v java)"
  else
    die "java not found: install a Java 17+ runtime (e.g. apt-get install openjdk-17-jre-headless) or set JAVA_HOME"
  fi
  local ver major
  ver="$("$JAVA" -version 2>&1 | sed -n 's/.*version "\([^"]*\)".*/\1/p' | head -n1)"
  major="${ver%%.*}"
  [[ "$major" == 1 ]] && major="$(echo "$ver" | cut -d. -f2)"
  [[ "$major" =~ ^[0-9]+$ ]] || die "cannot tell the version of $JAVA (got '$ver')"
  ((major >= 17)) || die "Kafka 4 needs Java 17+, but $JAVA is version $ver (set JAVA_HOME)"
}

# true when something accepts TCP connections on $HOST:$1
port_open() {
  timeout 2 bash -c "exec 3<>/dev/tcp/$HOST/$1" >/dev/null 2>&1
}

# pid of our running broker, or nothing (and removes a stale pid file)
running_pid() {
  [[ -f "$PIDFILE" ]] || return 0
  local pid
  pid="$(tr -dc '0-9' <"$PIDFILE")"
  if [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null &&
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q 'kafka\.Kafka'; then
    echo "$pid"
  else
    rm -f "$PIDFILE"
  fi
}

# client address of the running broker, from the server.properties it was started with
running_bootstrap() {
  local a
  a="$(sed -n 's|^advertised.listeners=PLAINTEXT://||p' "$PROPS" 2>/dev/null | head -n1)"
  echo "${a:-$HOST:$PORT}"
}

rss_mib() {
  local kb
  kb="$(ps -o rss= -p "$1" 2>/dev/null | tr -d ' ')"
  [[ -n "$kb" ]] && echo "$((kb / 1024))MiB" || echo "?"
}

# Sends a Kafka Metadata v1 request (no topics) and succeeds when the broker lists itself.
# Uses only the Python standard library; when python3 is missing, falls back to the log line.
broker_answers() {
  if command -v python3 >/dev/null 2>&1; then
    python3 - "$HOST" "$PORT" "$NODE_ID" <<'PY' >/dev/null 2>&1
import socket, struct, sys
host, port, node = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
cid = b"lightmem-kafka-sh"
# header v1: api_key=3 (Metadata), api_version=1, correlation_id, client_id; body: topics=[] (none)
req = struct.pack(">hhih", 3, 1, 7, len(cid)) + cid + struct.pack(">i", 0)
with socket.create_connection((host, port), timeout=3) as s:
    s.settimeout(3)
    s.sendall(struct.pack(">i", len(req)) + req)
    def read(n):
        buf = b""
        while len(buf) < n:
            chunk = s.recv(n - len(buf))
            if not chunk:
                raise EOFError
            buf += chunk
        return buf
    (size,) = struct.unpack(">i", read(4))
    body = read(size)
corr, nbrokers = struct.unpack_from(">ii", body, 0)
off, ids = 8, []
for _ in range(nbrokers):
    (nid,) = struct.unpack_from(">i", body, off); off += 4
    (hl,) = struct.unpack_from(">h", body, off); off += 2 + hl
    off += 4  # port
    (rl,) = struct.unpack_from(">h", body, off); off += 2 + max(rl, 0)
    ids.append(nid)
(controller,) = struct.unpack_from(">i", body, off)
sys.exit(0 if corr == 7 and node in ids and controller >= 0 else 1)
PY
  else
    grep -q 'Kafka Server started' "$SERVER_LOG" 2>/dev/null
  fi
}

with_lock() {
  # Serialises fetch/up/down of concurrent callers (the lock is per jar cache).
  mkdir -p "$KHOME"
  exec 9>"$KHOME/.lock"
  if command -v flock >/dev/null 2>&1; then
    flock -w 300 9 || die "timed out waiting for the lock $KHOME/.lock"
  fi
}

# --- subcommands -------------------------------------------------------------------------------

cmd_fetch() {
  local want
  want="$(marker_content)"
  if [[ -f "$MARKER" && "$(cat "$MARKER")" == "$want" ]]; then
    return 0
  fi
  local mvn="${MVN:-mvn}"
  command -v "$mvn" >/dev/null 2>&1 || die "maven ('$mvn') not found: install Maven 3.6.3+ (e.g. apt-get install maven) or set MVN"
  find_java
  local tmp="$KHOME/libs.tmp.$$" t0=$SECONDS
  rm -rf "$tmp"
  mkdir -p "$tmp"
  info "fetching Kafka $(kafka_version) jars from Maven Central into $LIBS ..."
  # (the sed drops the bare ANSI resets that Debian's Maven 3.8 prints even with -q -B)
  if ! (cd "$SCRIPT_DIR" && "$mvn" -q -B -Dstyle.color=never -f "$POM" \
    dependency:copy-dependencies -DoutputDirectory="$tmp" -DincludeScope=runtime </dev/null 2>&1 |
    sed -e 's/\x1b\[0m//g' -e '/^$/d' >&2); then
    rm -rf "$tmp"
    die "mvn failed to resolve the Kafka jars (see the output above)"
  fi
  ls "$tmp"/kafka_2.13-*.jar >/dev/null 2>&1 || { rm -rf "$tmp"; die "mvn ran but copied no kafka_2.13 jar into $tmp"; }
  echo "$want" >"$tmp/.lightmem-kafka-version"
  rm -rf "$LIBS"
  mv "$tmp" "$LIBS"
  info "fetched $(find "$LIBS" -name '*.jar' | wc -l) jars ($(du -sh "$LIBS" | cut -f1)) in $((SECONDS - t0))s"
}

write_configs() {
  mkdir -p "$DATA" "$LOGDIRS"
  cat >"$PROPS" <<EOF
# Written by deploy/kafka/kafka.sh on every 'up'; edits are overwritten.
process.roles=broker,controller
node.id=$NODE_ID
controller.quorum.voters=$NODE_ID@$HOST:$CPORT
controller.listener.names=CONTROLLER
listeners=PLAINTEXT://$HOST:$PORT,CONTROLLER://$HOST:$CPORT
advertised.listeners=PLAINTEXT://$HOST:$PORT
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
log.dirs=$LOGDIRS
num.partitions=1
auto.create.topics.enable=true
default.replication.factor=1
min.insync.replicas=1
offsets.topic.replication.factor=1
offsets.topic.num.partitions=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
num.network.threads=2
num.io.threads=4
num.recovery.threads.per.data.dir=1
log.retention.hours=168
EOF
  cat >"$LOG4J" <<EOF
# Written by deploy/kafka/kafka.sh: broker log to $SERVER_LOG (10 MB x 3).
status = warn
appender.file.type = RollingFile
appender.file.name = file
appender.file.fileName = $SERVER_LOG
appender.file.filePattern = $SERVER_LOG.%i
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
appender.file.policies.type = Policies
appender.file.policies.size.type = SizeBasedTriggeringPolicy
appender.file.policies.size.size = 10MB
appender.file.strategy.type = DefaultRolloverStrategy
appender.file.strategy.max = 3
rootLogger.level = INFO
rootLogger.appenderRef.file.ref = file
logger.request.name = kafka.request.logger
logger.request.level = WARN
logger.statechange.name = state.change.logger
logger.statechange.level = WARN
EOF
}

cmd_up() {
  check_port_var LIGHTMEM_KAFKA_PORT "$PORT"
  check_port_var LIGHTMEM_KAFKA_CONTROLLER_PORT "$CPORT"
  [[ "$PORT" != "$CPORT" ]] || die "LIGHTMEM_KAFKA_PORT and LIGHTMEM_KAFKA_CONTROLLER_PORT are both $PORT"
  [[ "$START_TIMEOUT" =~ ^[0-9]+$ ]] || die "LIGHTMEM_KAFKA_START_TIMEOUT must be whole seconds"
  with_lock
  local pid
  pid="$(running_pid)"
  if [[ -n "$pid" ]]; then
    info "already running: bootstrap=$(running_bootstrap) pid=$pid data=$DATA"
    return 0
  fi
  find_java
  cmd_fetch
  local p
  for p in "$PORT" "$CPORT"; do
    if port_open "$p"; then
      die "port $HOST:$p is busy (another process listens there); stop it or set LIGHTMEM_KAFKA_PORT / LIGHTMEM_KAFKA_CONTROLLER_PORT"
    fi
  done

  local t0
  t0="$(date +%s.%N)"
  write_configs
  local formatted=yes
  if [[ ! -f "$LOGDIRS/meta.properties" ]]; then
    formatted=no
    # cluster id: 16 random bytes, base64url without padding (what `kafka-storage random-uuid` prints); passed
    # as --cluster-id=ID because one in 64 ids starts with "-", which a separate argument would read as a flag
    local cluster_id
    cluster_id="$(head -c16 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=\n')"
    if ! "$JAVA" -Xmx256m -Dlog4j2.configurationFile="$LOG4J" -cp "$LIBS/*" kafka.tools.StorageTool \
      format --cluster-id="$cluster_id" -c "$PROPS" >"$DATA/format.out" 2>&1; then
      cat "$DATA/format.out" >&2
      die "formatting $LOGDIRS failed"
    fi
  fi

  # setsid: own session, so a Ctrl-C or a killed process group of the caller leaves it running;
  # nohup + redirections: no terminal, and no pipe of the caller held open (subprocess-friendly).
  local setsid=()
  command -v setsid >/dev/null 2>&1 && setsid=(setsid)
  # shellcheck disable=SC2086 # LIGHTMEM_KAFKA_JAVA_OPTS is split on purpose
  "${setsid[@]}" nohup "$JAVA" -Xmx"$HEAP" -XX:+UseG1GC -XX:MaxGCPauseMillis=20 \
    -XX:+ExitOnOutOfMemoryError -Djava.awt.headless=true \
    -Dlog4j2.configurationFile="$LOG4J" -Dkafka.logs.dir="$DATA" \
    ${LIGHTMEM_KAFKA_JAVA_OPTS:-} \
    -cp "$LIBS/*" kafka.Kafka "$PROPS" >"$OUT_LOG" 2>&1 </dev/null 9>&- &
  pid=$!
  echo "$pid" >"$PIDFILE"
  sleep 0.2
  if kill -0 "$pid" 2>/dev/null && [[ -z "$(running_pid)" ]]; then
    die "started pid $pid, but it is not the broker (setsid forked?); see $OUT_LOG"
  fi

  local deadline=$((SECONDS + START_TIMEOUT))
  while :; do
    if ! kill -0 "$pid" 2>/dev/null; then
      rm -f "$PIDFILE"
      echo "--- tail of $OUT_LOG:" >&2; tail -n 20 "$OUT_LOG" >&2 || true
      echo "--- tail of $SERVER_LOG:" >&2; tail -n 30 "$SERVER_LOG" >&2 || true
      die "the broker exited during start-up (logs above; data dir $DATA)"
    fi
    if port_open "$PORT" && broker_answers; then
      break
    fi
    if ((SECONDS >= deadline)); then
      echo "--- tail of $SERVER_LOG:" >&2; tail -n 30 "$SERVER_LOG" >&2 || true
      kill -TERM "$pid" 2>/dev/null || true
      sleep 5
      kill -KILL "$pid" 2>/dev/null || true
      rm -f "$PIDFILE"
      die "the broker did not answer on $HOST:$PORT within ${START_TIMEOUT}s; stopped it"
    fi
    sleep 0.25
  done
  local secs
  secs="$(echo "$(date +%s.%N) $t0" | awk '{printf "%.1f", $1 - $2}')"
  info "up: bootstrap=$HOST:$PORT pid=$pid started_in=${secs}s rss=$(rss_mib "$pid") kafka=$(kafka_version) formatted_before=$formatted data=$DATA"
}

cmd_down() {
  local purge=no
  case "${1:-}" in
    "") ;;
    --purge) purge=yes ;;
    *) usage >&2; die "unknown option for down: $1" ;;
  esac
  with_lock
  local pid
  pid="$(running_pid)"
  if [[ -z "$pid" ]]; then
    info "not running (data=$DATA)"
  else
    kill -TERM "$pid" 2>/dev/null || true
    local i
    for ((i = 0; i < 80; i++)); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.25
    done
    if kill -0 "$pid" 2>/dev/null; then
      info "pid $pid still alive after 20s; sending SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
      for ((i = 0; i < 20; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.25
      done
    fi
    rm -f "$PIDFILE"
    info "stopped (pid $pid)"
  fi
  if [[ "$purge" == yes && -e "$DATA" ]]; then
    local real
    real="$(cd "$DATA" && pwd -P)"
    [[ "$real" != "/" && "$real" != "$(cd "$HOME" && pwd -P)" ]] || die "refusing to delete $DATA"
    rm -rf -- "$real"
    info "purged $DATA"
  fi
}

cmd_status() {
  local pid
  pid="$(running_pid)"
  if [[ -n "$pid" ]]; then
    info "running: bootstrap=$(running_bootstrap) pid=$pid rss=$(rss_mib "$pid") data=$DATA"
    return 0
  fi
  info "not running (data=$DATA)"
  return 1
}

case "${1:-}" in
  fetch) shift; [[ $# -eq 0 ]] || die "fetch takes no arguments"; with_lock; cmd_fetch ;;
  up) shift; [[ $# -eq 0 ]] || die "up takes no arguments"; cmd_up ;;
  down) shift; [[ $# -le 1 ]] || die "down takes at most --purge"; cmd_down "$@" ;;
  status) shift; [[ $# -eq 0 ]] || die "status takes no arguments"; cmd_status ;;
  -h | --help | help) usage ;;
  *) usage >&2; exit 2 ;;
esac
