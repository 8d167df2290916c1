# shellcheck shell=bash
# Apache Kafka 4.x (KRaft, one combined broker+controller) for scripts/testbed.
# Sourced, never run on its own.
#
# Verified here with 4.3.1 from Maven Central (kafka_2.13 + kafka-tools; kafka-tools 4.4.0 is
# not served):
# - the jars bring log4j-core/log4j-api 2.25.4 and slf4j-api 1.7.36 but no slf4j binding:
#   log4j-slf4j-impl (the slf4j 1.x binding) is added by the pom, else the broker logs nothing;
# - `kafka.tools.StorageTool random-uuid` then `format --standalone -t ID -c server.properties`
#   formats a fresh dir; formatting again fails ("already formatted") unless -g is given;
# - the broker says "Kafka Server started" 3-4 s after start on 2 cores;
# - tool classes: org.apache.kafka.tools.TopicCommand, org.apache.kafka.tools.ConsoleProducer,
#   org.apache.kafka.tools.consumer.ConsoleConsumer (not org.apache.kafka.tools.ConsoleConsumer);
#   ConsoleProducer's --producer-property is deprecated in 4.3 in favour of --command-property;
# - after a crash (SIGKILL) the restarted broker is refused by its own controller
#   (DUPLICATE_BROKER_REGISTRATION) until the old registration's session times out
#   (broker.session.timeout.ms, 9 s): startup then takes ~13 s instead of ~4 s.

kafka_dir() { echo "$TB_DIR/kafka"; }
kafka_pidfile() { echo "$(kafka_dir)/kafka.pid"; }
kafka_logfile() { echo "$(kafka_dir)/logs/kafka.out"; }
kafka_config() { echo "$(kafka_dir)/server.properties"; }
kafka_bootstrap() { echo "127.0.0.1:$KAFKA_PORT"; }

kafka_lib() {
  local lib
  lib=$(fetch_jars "kafka-$KAFKA_VERSION" "$TB_TEMPLATES/kafka-pom.xml" \
    "KAFKA_VERSION=$KAFKA_VERSION" "LOG4J_VERSION=$KAFKA_LOG4J_VERSION") || exit 1
  printf '%s\n' "$lib"
}

# kafka_tool CLASS ARGS... : run a Kafka command-line tool (logs: warnings on stderr), killed
# after $TB_TOOL_TIMEOUT seconds.
kafka_tool() {
  local class=$1 lib java
  shift
  lib=$(kafka_lib) || exit 1
  java=$(java_bin)
  timeout -k 5 "$TB_TOOL_TIMEOUT" "$java" "${TOOL_JVM[@]}" \
    -Dlog4j2.configurationFile="$TB_TEMPLATES/kafka-tools-log4j2.xml" -cp "$lib/*" "$class" "$@"
}

kafka_pid() { our_pid "$(kafka_pidfile)" "$(kafka_config)" "$KAFKA_PORT"; }

# kafka_topics : the topic list on stdout (fails when the broker does not answer; the tool's
# stderr is kept in .testbed/kafka/logs/tools.err).
kafka_topics() {
  mkdir -p "$(kafka_dir)/logs"
  kafka_tool org.apache.kafka.tools.TopicCommand --bootstrap-server "$(kafka_bootstrap)" --list \
    2>"$(kafka_dir)/logs/tools.err"
}

kafka_render_config() {
  local dir
  dir=$(kafka_dir)
  mkdir -p "$dir/data" "$dir/logs"
  render "$TB_TEMPLATES/kafka-server.properties.in" "$(kafka_config)" \
    "PORT=$KAFKA_PORT" "CONTROLLER_PORT=$KAFKA_CONTROLLER_PORT" "DATA_DIR=$dir/data"
}

# kafka_format : format the data dir once. The controller's address is written into the
# metadata log by `format --standalone`, so a data dir formatted for other ports is wiped.
kafka_format() {
  local dir stamp id
  dir=$(kafka_dir)
  stamp="127.0.0.1:$KAFKA_PORT,127.0.0.1:$KAFKA_CONTROLLER_PORT"
  if [[ -f $dir/data/meta.properties ]]; then
    if [[ $(cat "$dir/formatted-for" 2>/dev/null) == "$stamp" ]]; then
      return 0
    fi
    warn "kafka: data dir was formatted for other ports: wiping it"
  fi
  rm -rf "$dir/data"
  mkdir -p "$dir/data"
  id=$(kafka_tool kafka.tools.StorageTool random-uuid | tail -n1)
  [[ $id =~ ^[A-Za-z0-9_-]{22}$ ]] || die "kafka: StorageTool random-uuid printed '$id'"
  log "kafka: formatting storage (cluster id $id)"
  kafka_tool kafka.tools.StorageTool format --standalone -t "$id" -c "$(kafka_config)" >"$dir/logs/format.out" 2>&1 ||
    fail_with_logs "kafka: StorageTool format failed" "$dir/logs/format.out"
  printf '%s\n' "$stamp" >"$dir/formatted-for"
}

kafka_start() {
  local dir java lib
  dir=$(kafka_dir)
  lib=$(kafka_lib) || exit 1
  java=$(java_bin)
  kafka_render_config
  kafka_format
  rotate_log "$(kafka_logfile)"
  log "kafka: starting $KAFKA_VERSION on $(kafka_bootstrap) (controller 127.0.0.1:$KAFKA_CONTROLLER_PORT)"
  # shellcheck disable=SC2086
  launch "$(kafka_pidfile)" "$(kafka_logfile)" "$java" $KAFKA_HEAP -XX:+UseG1GC -XX:MaxGCPauseMillis=20 \
    -XX:InitiatingHeapOccupancyPercent=35 -XX:+ExplicitGCInvokesConcurrent \
    -Djava.awt.headless=true -Djava.net.preferIPv4Stack=true \
    -Dlog4j2.configurationFile="$TB_TEMPLATES/kafka-log4j2.xml" -Dkafka.logs.dir="$dir/logs" \
    -cp "$lib/*" kafka.Kafka "$(kafka_config)"
}

# kafka_wait_ready : the broker answers a topic list (kept in KAFKA_LAST_TOPICS).
KAFKA_LAST_TOPICS=""
kafka_wait_ready() {
  local deadline pid
  deadline=$(($(now_s) + TB_TIMEOUT))
  # Cheap checks first (log line, port), then the real one (a topic list over the wire).
  while :; do
    pid=$(kafka_pid) || fail_with_logs "kafka: the broker process exited during startup (if its data is broken: scripts/testbed down --purge kafka)" "$(kafka_logfile)"
    if grep -q 'Kafka Server started' "$(kafka_logfile)" 2>/dev/null && port_open "$KAFKA_PORT"; then
      break
    fi
    (($(now_s) < deadline)) || fail_with_logs "kafka: not started after ${TB_TIMEOUT}s (pid $pid)" "$(kafka_logfile)"
    sleep 0.3
  done
  until KAFKA_LAST_TOPICS=$(kafka_topics); do
    (($(now_s) < deadline)) || fail_with_logs "kafka: broker does not answer a topic list after ${TB_TIMEOUT}s" "$(kafka_dir)/logs/tools.err" "$(kafka_logfile)"
    sleep 1
  done
}

# kafka_ensure_topic NAME PARTITIONS : create the topic when missing. An existing topic with
# fewer partitions is grown; one with more is left alone (Kafka cannot shrink) with a warning.
kafka_ensure_topic() {
  local name=$1 parts=$2 out have
  [[ $parts =~ ^[1-9][0-9]*$ ]] || die "kafka: partitions must be a positive integer, not '$parts'"
  if out=$(kafka_tool org.apache.kafka.tools.TopicCommand --bootstrap-server "$(kafka_bootstrap)" \
    --create --topic "$name" --partitions "$parts" --replication-factor 1 2>&1); then
    log "kafka: created topic $name ($parts partitions)"
    return 0
  fi
  if [[ $out != *"already exists"* ]]; then
    printf '%s\n' "$out" >&2
    die "kafka: could not create topic $name"
  fi
  out=$(kafka_tool org.apache.kafka.tools.TopicCommand --bootstrap-server "$(kafka_bootstrap)" \
    --describe --topic "$name" 2>&1) || {
    printf '%s\n' "$out" >&2
    die "kafka: could not describe topic $name"
  }
  have=$(grep -o 'PartitionCount: *[0-9]*' <<<"$out" | head -n1 | grep -o '[0-9]*$')
  if [[ -z $have ]]; then
    printf '%s\n' "$out" >&2
    die "kafka: cannot read the partition count of topic $name"
  elif ((have < parts)); then
    log "kafka: topic $name has $have partitions: growing to $parts"
    kafka_tool org.apache.kafka.tools.TopicCommand --bootstrap-server "$(kafka_bootstrap)" \
      --alter --topic "$name" --partitions "$parts" >&2 || die "kafka: could not add partitions to $name"
  elif ((have > parts)); then
    warn "kafka: topic $name already exists with $have partitions (asked for $parts; Kafka cannot shrink)"
  else
    log "kafka: topic $name already exists ($have partitions)"
  fi
}

kafka_up() {
  local pid
  if pid=$(kafka_pid); then
    log "kafka: already running (pid $pid); checking it answers"
  else
    if port_open "$KAFKA_PORT" || port_open "$KAFKA_CONTROLLER_PORT"; then
      die "kafka: port $KAFKA_PORT or $KAFKA_CONTROLLER_PORT is taken by a process the test bed did not start (pid $(listener_pid "$KAFKA_PORT" || true)); stop it or set MQC_KAFKA_PORT / MQC_KAFKA_CONTROLLER_PORT"
    fi
    rm -f "$(kafka_pidfile)"
    kafka_start
  fi
  kafka_wait_ready
  local topics=$KAFKA_LAST_TOPICS
  if ! grep -qx "$SMOKE_TOPIC" <<<"$topics"; then
    kafka_ensure_topic "$SMOKE_TOPIC" "$SMOKE_KAFKA_PARTITIONS"
    topics=$(kafka_topics) || fail_with_logs "kafka: topic list failed" "$(kafka_dir)/logs/tools.err" "$(kafka_logfile)"
    grep -qx "$SMOKE_TOPIC" <<<"$topics" || fail_with_logs "kafka: topic $SMOKE_TOPIC missing right after its creation" "$(kafka_logfile)"
  fi
  if ! grep -qx "$EXAMPLE_TOPIC" <<<"$topics"; then
    kafka_ensure_topic "$EXAMPLE_TOPIC" 4
  fi
  log "kafka: ready on $(kafka_bootstrap) (topic list answers, $SMOKE_TOPIC and $EXAMPLE_TOPIC exist)"
}

# kafka_down : stop by pid file, or (pid file lost) the listener on the port if it is ours.
kafka_down() {
  local pid
  if pid=$(kafka_pid); then
    stop_pid "$pid" "kafka" 60
  else
    pid=$(listener_pid "$KAFKA_PORT" || true)
    [[ -z $pid ]] || warn "kafka: port $KAFKA_PORT is held by pid $pid, which the test bed did not start: left alone"
  fi
  rm -f "$(kafka_pidfile)"
}

kafka_status() {
  local pid
  if pid=$(kafka_pid); then
    if port_open "$KAFKA_PORT"; then
      printf '%-18s %-8s port=%-6s pid=%s controller=%s version=%s\n' kafka running "$KAFKA_PORT" "$pid" "$KAFKA_CONTROLLER_PORT" "$KAFKA_VERSION"
    else
      printf '%-18s %-8s port=%-6s pid=%s (process up, port not open yet)\n' kafka starting "$KAFKA_PORT" "$pid"
    fi
  elif port_open "$KAFKA_PORT"; then
    printf '%-18s %-8s port=%-6s pid=%s (external: not started by the test bed)\n' kafka running "$KAFKA_PORT" "$(listener_pid "$KAFKA_PORT" || echo '?')"
  else
    printf '%-18s %-8s port=%-6s\n' kafka stopped "$KAFKA_PORT"
  fi
}

# kafka_smoke : produce one unique record to a fresh topic and read it back.
kafka_smoke() {
  local run topic body out
  run="$(date +%s%N)-$$"
  topic="mqc-smoke-$run"
  body="mqc-smoke kafka $run"
  port_open "$KAFKA_PORT" || die "smoke kafka: FAILED: nothing listens on $(kafka_bootstrap) (run scripts/testbed up kafka)"
  kafka_ensure_topic "$topic" 1
  if ! out=$(printf '%s\n' "$body" | kafka_tool org.apache.kafka.tools.ConsoleProducer --bootstrap-server "$(kafka_bootstrap)" --topic "$topic" \
    --command-property acks=all 2>&1); then
    printf '%s\n' "$out" >&2
    die "smoke kafka: ConsoleProducer failed"
  fi
  out=$(kafka_tool org.apache.kafka.tools.consumer.ConsoleConsumer --bootstrap-server "$(kafka_bootstrap)" --topic "$topic" \
    --from-beginning --max-messages 1 --timeout-ms 30000 --group "mqc-smoke-$run" 2>/dev/null) || true
  kafka_tool org.apache.kafka.tools.TopicCommand --bootstrap-server "$(kafka_bootstrap)" \
    --delete --topic "$topic" >/dev/null 2>&1 || warn "smoke kafka: could not delete topic $topic"
  if ! grep -qxF "$body" <<<"$out"; then
    printf '%s\n' "consumed: ${out:-<nothing>}" >&2
    die "smoke kafka: FAILED: the record produced to $topic did not come back"
  fi
  log "smoke kafka: OK (produced and consumed '$body' on $(kafka_bootstrap))"
}

# ---------------------------------------------------------------------------- kafka-secure ---
# A second broker, its own process, ports and data dir ($TB_DIR/kafka-secure), so the plain one
# is never touched: one SASL_SSL listener (SCRAM-SHA-512) on 127.0.0.1:$KAFKA_SECURE_PORT, the
# test bed's server certificate in a PKCS12 keystore made with openssl, the SCRAM users
# $KAFKA_SECURE_ADMIN_USER (inter-broker, tools) and $KAFKA_SECURE_USER (clients) written at format
# time (`--add-scram`, KIP-900), their passwords in $TB_DIR/tls/kafka-*.secret.
kafka_secure_dir() { echo "$TB_DIR/kafka-secure"; }
kafka_secure_pidfile() { echo "$(kafka_secure_dir)/kafka.pid"; }
kafka_secure_logfile() { echo "$(kafka_secure_dir)/logs/kafka.out"; }
kafka_secure_config() { echo "$(kafka_secure_dir)/server.properties"; }
kafka_secure_bootstrap() { echo "127.0.0.1:$KAFKA_SECURE_PORT"; }
# The tools' client settings (SASL_SSL as the admin user).
kafka_secure_client_config() { echo "$(kafka_secure_dir)/admin-client.properties"; }

kafka_secure_pid() { our_pid "$(kafka_secure_pidfile)" "$(kafka_secure_config)" "$KAFKA_SECURE_PORT"; }

kafka_secure_render_config() {
  local dir tls kspw
  dir=$(kafka_secure_dir)
  tls=$(tb_tls_dir)
  mkdir -p "$dir/data" "$dir/logs"
  kspw=$(tb_secret kafka-secure-keystore)
  # The keystore is made again whenever the certificate is newer (a renewed test bed CA).
  if [[ ! -s $dir/server.p12 || $tls/server.pem -nt $dir/server.p12 ]]; then
    (umask 077 && openssl pkcs12 -export -in "$tls/server.pem" -inkey "$tls/server.key" \
      -certfile "$tls/ca.pem" -name kafka -out "$dir/server.p12" -passout "pass:$kspw") ||
      die "kafka-secure: openssl could not make the PKCS12 keystore"
  fi
  (
    umask 077
    render "$TB_TEMPLATES/kafka-secure-server.properties.in" "$(kafka_secure_config)" \
      "PORT=$KAFKA_SECURE_PORT" "CONTROLLER_PORT=$KAFKA_SECURE_CONTROLLER_PORT" "DATA_DIR=$dir/data" \
      "ADMIN_USER=$KAFKA_SECURE_ADMIN_USER" "ADMIN_PASSWORD=$(tb_secret kafka-secure-admin)" \
      "KEYSTORE=$dir/server.p12" "KEYSTORE_PASSWORD=$kspw" "CA_FILE=$tls/ca.pem"
    printf '%s\n' "security.protocol=SASL_SSL" "sasl.mechanism=SCRAM-SHA-512" \
      "sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required username=\"$KAFKA_SECURE_ADMIN_USER\" password=\"$(tb_secret kafka-secure-admin)\";" \
      "ssl.truststore.type=PEM" "ssl.truststore.location=$tls/ca.pem" >"$(kafka_secure_client_config)"
  )
}

# kafka_secure_format : format the data dir once, with the SCRAM users.
kafka_secure_format() {
  local dir stamp id
  dir=$(kafka_secure_dir)
  stamp="127.0.0.1:$KAFKA_SECURE_PORT,127.0.0.1:$KAFKA_SECURE_CONTROLLER_PORT"
  if [[ -f $dir/data/meta.properties ]]; then
    if [[ $(cat "$dir/formatted-for" 2>/dev/null) == "$stamp" ]]; then
      return 0
    fi
    warn "kafka-secure: data dir was formatted for other ports: wiping it"
  fi
  rm -rf "$dir/data"
  mkdir -p "$dir/data"
  id=$(kafka_tool kafka.tools.StorageTool random-uuid | tail -n1)
  [[ $id =~ ^[A-Za-z0-9_-]{22}$ ]] || die "kafka-secure: StorageTool random-uuid printed '$id'"
  log "kafka-secure: formatting storage (cluster id $id) with SCRAM-SHA-512 users $KAFKA_SECURE_ADMIN_USER, $KAFKA_SECURE_USER"
  kafka_tool kafka.tools.StorageTool format --standalone -t "$id" -c "$(kafka_secure_config)" \
    --add-scram "SCRAM-SHA-512=[name=$KAFKA_SECURE_ADMIN_USER,password=$(tb_secret kafka-secure-admin)]" \
    --add-scram "SCRAM-SHA-512=[name=$KAFKA_SECURE_USER,password=$(tb_secret kafka-secure)]" \
    >"$dir/logs/format.out" 2>&1 ||
    fail_with_logs "kafka-secure: StorageTool format failed" "$dir/logs/format.out"
  printf '%s\n' "$stamp" >"$dir/formatted-for"
}

# kafka_secure_topics : the topic list over SASL_SSL (fails when the broker does not answer).
kafka_secure_topics() {
  kafka_tool org.apache.kafka.tools.TopicCommand --bootstrap-server "$(kafka_secure_bootstrap)" \
    --command-config "$(kafka_secure_client_config)" --list 2>"$(kafka_secure_dir)/logs/tools.err"
}

kafka_secure_up() {
  local pid dir java lib deadline
  dir=$(kafka_secure_dir)
  tb_tls_material
  kafka_secure_render_config
  if pid=$(kafka_secure_pid); then
    log "kafka-secure: already running (pid $pid); checking it answers"
  else
    if port_open "$KAFKA_SECURE_PORT" || port_open "$KAFKA_SECURE_CONTROLLER_PORT"; then
      die "kafka-secure: port $KAFKA_SECURE_PORT or $KAFKA_SECURE_CONTROLLER_PORT is taken by a process the test bed did not start; set MQC_KAFKA_SECURE_PORT / MQC_KAFKA_SECURE_CONTROLLER_PORT"
    fi
    lib=$(kafka_lib) || exit 1
    java=$(java_bin)
    kafka_secure_format
    rotate_log "$(kafka_secure_logfile)"
    log "kafka-secure: starting $KAFKA_VERSION on SASL_SSL $(kafka_secure_bootstrap) (controller 127.0.0.1:$KAFKA_SECURE_CONTROLLER_PORT)"
    # shellcheck disable=SC2086
    launch "$(kafka_secure_pidfile)" "$(kafka_secure_logfile)" "$java" $KAFKA_SECURE_HEAP -XX:+UseG1GC \
      -XX:MaxGCPauseMillis=20 -Djava.awt.headless=true -Djava.net.preferIPv4Stack=true \
      -Dlog4j2.configurationFile="$TB_TEMPLATES/kafka-log4j2.xml" -Dkafka.logs.dir="$dir/logs" \
      -cp "$lib/*" kafka.Kafka "$(kafka_secure_config)"
  fi
  deadline=$(($(now_s) + TB_TIMEOUT))
  while :; do
    pid=$(kafka_secure_pid) || fail_with_logs "kafka-secure: the broker process exited during startup (if its data is broken: scripts/testbed down --purge kafka-secure)" "$(kafka_secure_logfile)"
    if grep -q 'Kafka Server started' "$(kafka_secure_logfile)" 2>/dev/null && port_open "$KAFKA_SECURE_PORT"; then
      break
    fi
    (($(now_s) < deadline)) || fail_with_logs "kafka-secure: not started after ${TB_TIMEOUT}s (pid $pid)" "$(kafka_secure_logfile)"
    sleep 0.3
  done
  until kafka_secure_topics >/dev/null; do
    (($(now_s) < deadline)) || fail_with_logs "kafka-secure: the broker does not answer a topic list over SASL_SSL after ${TB_TIMEOUT}s" "$dir/logs/tools.err" "$(kafka_secure_logfile)"
    sleep 1
  done
  log "kafka-secure: ready on SASL_SSL $(kafka_secure_bootstrap) (topic list answers as $KAFKA_SECURE_ADMIN_USER)"
}

kafka_secure_down() {
  local pid
  if pid=$(kafka_secure_pid); then
    stop_pid "$pid" "kafka-secure" 60
  fi
  rm -f "$(kafka_secure_pidfile)"
}

kafka_secure_status() {
  local pid
  if pid=$(kafka_secure_pid); then
    if port_open "$KAFKA_SECURE_PORT"; then
      printf '%-18s %-8s port=%-6s pid=%s controller=%s SASL_SSL SCRAM-SHA-512 user=%s\n' kafka-secure running "$KAFKA_SECURE_PORT" "$pid" "$KAFKA_SECURE_CONTROLLER_PORT" "$KAFKA_SECURE_USER"
    else
      printf '%-18s %-8s port=%-6s pid=%s (process up, port not open yet)\n' kafka-secure starting "$KAFKA_SECURE_PORT" "$pid"
    fi
  else
    printf '%-18s %-8s port=%-6s\n' kafka-secure stopped "$KAFKA_SECURE_PORT"
  fi
}

# kafka_secure_smoke : produce one unique record over SASL_SSL as the client user, read it back.
kafka_secure_smoke() {
  local run topic body out tls cfg
  run="$(date +%s%N)-$$"
  topic="mqc-smoke-$run"
  body="mqc-smoke kafka-secure $run"
  tls=$(tb_tls_dir)
  port_open "$KAFKA_SECURE_PORT" || die "smoke kafka-secure: FAILED: nothing listens on $(kafka_secure_bootstrap) (run scripts/testbed up kafka-secure)"
  cfg=$(mktemp)
  printf '%s\n' "security.protocol=SASL_SSL" "sasl.mechanism=SCRAM-SHA-512" \
    "sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required username=\"$KAFKA_SECURE_USER\" password=\"$(tb_secret kafka-secure)\";" \
    "ssl.truststore.type=PEM" "ssl.truststore.location=$tls/ca.pem" >"$cfg"
  if ! out=$(printf '%s\n' "$body" | kafka_tool org.apache.kafka.tools.ConsoleProducer --bootstrap-server "$(kafka_secure_bootstrap)" \
    --topic "$topic" --command-config "$cfg" --command-property acks=all 2>&1); then
    rm -f "$cfg"
    printf '%s\n' "$out" >&2
    die "smoke kafka-secure: ConsoleProducer failed"
  fi
  out=$(kafka_tool org.apache.kafka.tools.consumer.ConsoleConsumer --bootstrap-server "$(kafka_secure_bootstrap)" --topic "$topic" \
    --command-config "$cfg" --from-beginning --max-messages 1 --timeout-ms 30000 --group "mqc-smoke-$run" 2>/dev/null) || true
  kafka_tool org.apache.kafka.tools.TopicCommand --bootstrap-server "$(kafka_secure_bootstrap)" \
    --command-config "$(kafka_secure_client_config)" --delete --topic "$topic" >/dev/null 2>&1 || warn "smoke kafka-secure: could not delete topic $topic"
  rm -f "$cfg"
  if ! grep -qxF "$body" <<<"$out"; then
    printf '%s\n' "consumed: ${out:-<nothing>}" >&2
    die "smoke kafka-secure: FAILED: the record produced to $topic did not come back"
  fi
  log "smoke kafka-secure: OK (produced and consumed over SASL_SSL as $KAFKA_SECURE_USER)"
}
