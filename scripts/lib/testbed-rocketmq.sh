# shellcheck shell=bash
# Apache RocketMQ 5.x (one name server + one broker, remoting protocol) for scripts/testbed.
# Sourced, never run on its own.
#
# Verified here with 5.3.3 from Maven Central (rocketmq-namesrv + rocketmq-broker +
# rocketmq-tools; the 5.5.1 jars of namesrv/client/tools are not served):
# - ROCKETMQ_HOME / rocketmq.home.dir must be set (NamesrvStartup exits 254, i.e. -2, without);
#   logs go to ${user.home}/logs/rocketmqlogs and the name server's kvConfig to
#   ${user.home}/namesrv, hence -Duser.home=<dir> per process;
# - config files are java.util.Properties (whole-line # comments are fine, inline ones are not);
# - each jar carries its own logback file (rmq.namesrv/broker/tools.logback.xml), picked with
#   -Drmq.logback.configurationFile;
# - `bindAddress=127.0.0.1` (NettyServerConfig) keeps the name server, the broker port and the
#   fast port (listenPort-2) on loopback; without it they listen on 0.0.0.0. The HA port
#   (listenPort+1) always binds 0.0.0.0 (DefaultHAService uses InetSocketAddress(port)): no
#   setting changes that, and nothing connects to it with a single master;
# - ready lines: "The Name Server boot success. ... address 127.0.0.1:<port>" and
#   "The broker[broker-a, 127.0.0.1:<port>] boot success. ..." on stdout;
# - mqadmin (MQAdminStartup) takes 4-7 s per call on 2 cores, most of it in client shutdown
#   (a 3 s event-loop poll plus netty's graceful shutdown), not in the request;
# - mqadmin exits 0 even when the command failed: its output is checked instead;
# - the broker takes 12-17 s to stop on SIGTERM (it unregisters from the name server first, then
#   stops its service threads one after the other), the name server ~6 s;
# - after a crash (SIGKILL) the restarted broker may not route its old topics at once: `up`
#   then falls back to clusterList + updateTopic.
# - the broker refuses every write (SERVICE_NOT_AVAILABLE, code 14) while the disk holding its
#   commit log is above diskSpaceWarningLevelRatio, and the store clamps that ratio to at most
#   90 %: no setting lets it write on a fuller disk. On a shared build machine a release build
#   can push the disk past 90 % mid-run, so the store lives on tmpfs (/dev/shm) when there is
#   one: see rmq_store_dir.

rmq_dir() { echo "$TB_DIR/rocketmq"; }
# rmq_store_dir : where the broker keeps its commit log, consume queues and config
# (topics.json, consumer offsets). MQC_ROCKETMQ_STORE picks it; otherwise a writable tmpfs at
# /dev/shm with at least 2 GiB free, in a directory named after this test bed (so two clones do
# not share a store); otherwise the test bed's own directory on disk. The choice is recorded on
# first use and kept while the recorded directory's parent exists, so the store does not move
# between runs.
rmq_store_dir() {
  local record chosen shm_free
  if [[ -n ${MQC_ROCKETMQ_STORE:-} ]]; then
    printf '%s\n' "$MQC_ROCKETMQ_STORE"
    return 0
  fi
  record="$(rmq_dir)/store-dir"
  if [[ -s $record ]]; then
    chosen=$(cat "$record")
    if [[ -d $(dirname "$chosen") ]]; then
      printf '%s\n' "$chosen"
      return 0
    fi
  fi
  chosen="$(rmq_dir)/broker/store"
  if [[ $(stat -f -c %T /dev/shm 2>/dev/null) == tmpfs && -w /dev/shm ]]; then
    shm_free=$(df -P -k /dev/shm | awk 'NR==2 {print $4}')
    if [[ $shm_free =~ ^[0-9]+$ ]] && ((shm_free >= 2 * 1024 * 1024)); then
      chosen="/dev/shm/mq-cutover-$(printf '%s' "$TB_DIR" | cksum | cut -d' ' -f1)/rocketmq-store"
    fi
  fi
  mkdir -p "$(rmq_dir)" "$(dirname "$chosen")"
  printf '%s\n' "$chosen" >"$record"
  printf '%s\n' "$chosen"
}
# rmq_purge : delete all RocketMQ data, the store too when it lives outside rmq_dir.
rmq_purge() {
  local store
  if [[ -z ${MQC_ROCKETMQ_STORE:-} && -s $(rmq_dir)/store-dir ]]; then
    store=$(cat "$(rmq_dir)/store-dir")
    rm -rf "$store"
    [[ $store != /dev/shm/mq-cutover-* ]] || rmdir "$(dirname "$store")" 2>/dev/null || true
  fi
  rm -rf "$(rmq_dir)"
}
rmq_namesrv_addr() { echo "127.0.0.1:$ROCKETMQ_NAMESRV_PORT"; }
rmq_broker_addr() { echo "127.0.0.1:$ROCKETMQ_BROKER_PORT"; }
rmq_namesrv_pidfile() { echo "$(rmq_dir)/namesrv.pid"; }
rmq_broker_pidfile() { echo "$(rmq_dir)/broker.pid"; }
rmq_namesrv_out() { echo "$(rmq_dir)/logs/namesrv.out"; }
rmq_broker_out() { echo "$(rmq_dir)/logs/broker.out"; }
rmq_namesrv_conf() { echo "$(rmq_dir)/namesrv.conf"; }
rmq_broker_conf() { echo "$(rmq_dir)/broker.conf"; }
# Logs that RocketMQ itself writes (logback), under each process' user.home.
rmq_namesrv_log() { echo "$(rmq_dir)/namesrv/logs/rocketmqlogs/namesrv.log"; }
rmq_broker_log() { echo "$(rmq_dir)/broker/logs/rocketmqlogs/broker.log"; }

rmq_lib() {
  local lib
  lib=$(fetch_jars "rocketmq-$ROCKETMQ_VERSION" "$TB_TEMPLATES/rocketmq-pom.xml" \
    "ROCKETMQ_VERSION=$ROCKETMQ_VERSION") || exit 1
  printf '%s\n' "$lib"
}

# JDK 17: the stock start scripts open these packages (netty, mmap cleaner).
RMQ_OPENS=(--add-opens java.base/java.nio=ALL-UNNAMED --add-opens java.base/jdk.internal.ref=ALL-UNNAMED
  --add-opens java.base/java.util=ALL-UNNAMED --add-opens java.base/java.lang=ALL-UNNAMED
  --add-opens java.base/sun.nio.ch=ALL-UNNAMED --add-exports java.base/sun.nio.ch=ALL-UNNAMED)

# rmq_admin SUBCOMMAND ARGS... : run mqadmin, killed after $TB_TOOL_TIMEOUT seconds.
rmq_admin() {
  local lib java dir
  lib=$(rmq_lib) || exit 1
  java=$(java_bin)
  dir=$(rmq_dir)
  mkdir -p "$dir/home" "$dir/tools"
  timeout -k 5 "$TB_TOOL_TIMEOUT" "$java" "${TOOL_JVM[@]}" "${RMQ_OPENS[@]}" \
    -Drocketmq.home.dir="$dir/home" -Duser.home="$dir/tools" \
    -Drmq.logback.configurationFile=rmq.tools.logback.xml \
    -cp "$lib/*" org.apache.rocketmq.tools.command.MQAdminStartup "$@"
}

rmq_namesrv_pid() { our_pid "$(rmq_namesrv_pidfile)" "$(rmq_namesrv_conf)" "$ROCKETMQ_NAMESRV_PORT"; }
rmq_broker_pid() { our_pid "$(rmq_broker_pidfile)" "$(rmq_broker_conf)" "$ROCKETMQ_BROKER_PORT"; }

rmq_render_configs() {
  local dir store
  dir=$(rmq_dir)
  store=$(rmq_store_dir)
  mkdir -p "$dir/home" "$dir/logs" "$dir/namesrv" "$dir/broker" "$dir/tools" "$store"
  # Moved to tmpfs by the automatic choice (not by an override, which may be temporary).
  if [[ -z ${MQC_ROCKETMQ_STORE:-} && $store != "$dir/broker/store" && -d $dir/broker/store ]]; then
    warn "rocketmq: the broker store now lives at $store: deleting the old one at $dir/broker/store"
    rm -rf "$dir/broker/store"
  fi
  render "$TB_TEMPLATES/rocketmq-namesrv.conf.in" "$(rmq_namesrv_conf)" \
    "NAMESRV_PORT=$ROCKETMQ_NAMESRV_PORT"
  render "$TB_TEMPLATES/rocketmq-broker.conf.in" "$(rmq_broker_conf)" \
    "CLUSTER=$ROCKETMQ_CLUSTER" "BROKER_NAME=$ROCKETMQ_BROKER_NAME" \
    "NAMESRV_PORT=$ROCKETMQ_NAMESRV_PORT" "BROKER_PORT=$ROCKETMQ_BROKER_PORT" \
    "STORE_DIR=$store"
}

# rmq_wait_line FILE PATTERN PID_FUNC WHAT LOGS... : wait for a ready line in FILE.
rmq_wait_line() {
  local file=$1 pattern=$2 pidf=$3 what=$4 deadline
  shift 4
  deadline=$(($(now_s) + TB_TIMEOUT))
  until grep -qF "$pattern" "$file" 2>/dev/null; do
    "$pidf" >/dev/null || fail_with_logs "rocketmq: the $what exited during startup (if its data is broken: scripts/testbed down --purge rocketmq)" "$@"
    (($(now_s) < deadline)) || fail_with_logs "rocketmq: the $what did not boot within ${TB_TIMEOUT}s" "$@"
    sleep 0.3
  done
}

rmq_start_namesrv() {
  local dir lib java
  dir=$(rmq_dir)
  lib=$(rmq_lib) || exit 1
  java=$(java_bin)
  rotate_log "$(rmq_namesrv_out)"
  log "rocketmq: starting name server $ROCKETMQ_VERSION on $(rmq_namesrv_addr)"
  # shellcheck disable=SC2086
  ROCKETMQ_HOME="$dir/home" launch "$(rmq_namesrv_pidfile)" "$(rmq_namesrv_out)" \
    "$java" $ROCKETMQ_NAMESRV_HEAP -XX:+UseG1GC -XX:-OmitStackTraceInFastThrow "${RMQ_OPENS[@]}" \
    -Djava.awt.headless=true -Djava.net.preferIPv4Stack=true \
    -Drocketmq.home.dir="$dir/home" -Duser.home="$dir/namesrv" \
    -Drmq.logback.configurationFile=rmq.namesrv.logback.xml \
    -cp "$lib/*" org.apache.rocketmq.namesrv.NamesrvStartup -c "$(rmq_namesrv_conf)"
  rmq_wait_line "$(rmq_namesrv_out)" "The Name Server boot success" rmq_namesrv_pid "name server" \
    "$(rmq_namesrv_out)" "$(rmq_namesrv_log)"
}

rmq_start_broker() {
  local dir lib java offset
  dir=$(rmq_dir)
  lib=$(rmq_lib) || exit 1
  java=$(java_bin)
  disk_check "$(rmq_store_dir)"
  rotate_log "$(rmq_broker_out)"
  offset=$(stat -c %s "$(rmq_broker_log)" 2>/dev/null || echo 0)
  log "rocketmq: starting broker $ROCKETMQ_BROKER_NAME on $(rmq_broker_addr)"
  # shellcheck disable=SC2086
  ROCKETMQ_HOME="$dir/home" launch "$(rmq_broker_pidfile)" "$(rmq_broker_out)" \
    "$java" $ROCKETMQ_BROKER_HEAP -XX:+UseG1GC -XX:G1HeapRegionSize=16m -XX:G1ReservePercent=25 \
    -XX:InitiatingHeapOccupancyPercent=30 -XX:SoftRefLRUPolicyMSPerMB=0 -XX:-OmitStackTraceInFastThrow \
    "${RMQ_OPENS[@]}" -Djava.awt.headless=true -Djava.net.preferIPv4Stack=true \
    -Drocketmq.home.dir="$dir/home" -Duser.home="$dir/broker" \
    -Drmq.logback.configurationFile=rmq.broker.logback.xml \
    -cp "$lib/*" org.apache.rocketmq.broker.BrokerStartup -c "$(rmq_broker_conf)" -n "$(rmq_namesrv_addr)"
  rmq_wait_line "$(rmq_broker_out)" "The broker[$ROCKETMQ_BROKER_NAME, $(rmq_broker_addr)] boot success" \
    rmq_broker_pid "broker" "$(rmq_broker_out)" "$(rmq_broker_log)"
  # "boot success" comes before the broker has registered with the name server: seen here, the
  # first registration is often the periodic one, 10 s after start. Every registration logs
  # this line in broker.log (BrokerOuterAPI.registerBrokerAll); only lines after $offset count.
  local deadline
  deadline=$(($(now_s) + TB_TIMEOUT))
  until tail -c +$((offset + 1)) "$(rmq_broker_log)" 2>/dev/null |
    grep -qF "Registering current broker to name server completed"; do
    rmq_broker_pid >/dev/null || fail_with_logs "rocketmq: the broker exited during startup" "$(rmq_broker_out)" "$(rmq_broker_log)"
    (($(now_s) < deadline)) || fail_with_logs "rocketmq: the broker did not register with the name server within ${TB_TIMEOUT}s" "$(rmq_broker_log)" "$(rmq_namesrv_log)"
    sleep 0.3
  done
  log "rocketmq: broker registered with the name server"
}

# rmq_wait_registered : clusterList shows our broker (name and address) in DefaultCluster.
rmq_wait_registered() {
  local deadline out
  deadline=$(($(now_s) + TB_TIMEOUT))
  while :; do
    out=$(rmq_admin clusterList -n "$(rmq_namesrv_addr)" 2>&1) || true
    if awk -v c="$ROCKETMQ_CLUSTER" -v b="$ROCKETMQ_BROKER_NAME" -v a="$(rmq_broker_addr)" \
      '$1==c && $2==b && $4==a {found=1} END {exit !found}' <<<"$out"; then
      return 0
    fi
    if (($(now_s) >= deadline)); then
      printf '%s\n' "$out" >&2
      fail_with_logs "rocketmq: broker $ROCKETMQ_BROKER_NAME ($(rmq_broker_addr)) not registered with the name server after ${TB_TIMEOUT}s" \
        "$(rmq_broker_out)" "$(rmq_broker_log)"
    fi
    sleep 1
  done
}

# rmq_topic_routed NAME [MIN_QUEUES] : the name server has a route for NAME to our broker
# (which implies the broker is registered and the topic exists on it).
rmq_topic_routed() {
  local name=$1 min=${2:-1} out
  out=$(rmq_admin topicRoute -n "$(rmq_namesrv_addr)" -t "$name" 2>&1) || return 1
  grep -qF "\"$(rmq_broker_addr)\"" <<<"$out" || return 1
  local wq
  wq=$(grep -o '"writeQueueNums":[0-9]*' <<<"$out" | head -n1 | cut -d: -f2)
  [[ -n $wq ]] && ((wq >= min))
}

# rmq_ensure_topic NAME QUEUES [WAIT_SECONDS] [VERIFY] : create the topic on every master of the
# cluster (or set its read/write queue counts to QUEUES: updateTopic is idempotent), retrying for
# up to WAIT_SECONDS (default 30) while the broker is not yet registered. updateTopic -c resolves
# the cluster's brokers through the name server, so its success also proves the broker is
# registered there; and the broker registers the new topic with the name server before it
# answers (AdminBrokerProcessor.updateAndCreateTopic -> registerIncrementBrokerData ->
# BrokerOuterAPI.registerBrokerAll, which waits for the name servers), so the route exists when
# this returns. With VERIFY=1 (what `up` uses) the route is checked anyway (one more mqadmin call).
rmq_ensure_topic() {
  local name=$1 queues=$2 wait=${3:-30} verify=${4:-0} out deadline
  [[ $queues =~ ^[1-9][0-9]*$ ]] || die "rocketmq: queues must be a positive integer, not '$queues'"
  deadline=$(($(now_s) + wait))
  while :; do
    out=$(rmq_admin updateTopic -n "$(rmq_namesrv_addr)" -c "$ROCKETMQ_CLUSTER" -t "$name" \
      -r "$queues" -w "$queues" 2>&1) || true
    grep -qF "create topic to $(rmq_broker_addr) success" <<<"$out" && break
    if (($(now_s) >= deadline)); then
      printf '%s\n' "$out" | tail -n 20 >&2
      printf '[testbed] clusterList says:\n' >&2
      rmq_admin clusterList -n "$(rmq_namesrv_addr)" >&2 2>&1 || true
      die "rocketmq: updateTopic $name failed (is rocketmq up? scripts/testbed up rocketmq; logs: scripts/testbed logs rocketmq)"
    fi
    sleep 1
  done
  if ((verify)); then
    deadline=$(($(now_s) + 30))
    until rmq_topic_routed "$name" "$queues"; do
      (($(now_s) < deadline)) || die "rocketmq: topic $name created but not routed by the name server after 30 s"
      sleep 1
    done
  fi
  log "rocketmq: topic $name ready ($queues queues)"
}

rmq_up() {
  local pid started=0
  rmq_render_configs
  if pid=$(rmq_namesrv_pid); then
    log "rocketmq: name server already running (pid $pid)"
  else
    if port_open "$ROCKETMQ_NAMESRV_PORT"; then
      die "rocketmq: port $ROCKETMQ_NAMESRV_PORT is taken by a process the test bed did not start (pid $(listener_pid "$ROCKETMQ_NAMESRV_PORT" || true)); stop it or set MQC_ROCKETMQ_NAMESRV_PORT"
    fi
    rm -f "$(rmq_namesrv_pidfile)"
    rmq_start_namesrv
  fi
  if pid=$(rmq_broker_pid); then
    log "rocketmq: broker already running (pid $pid)"
  else
    local p
    for p in "$ROCKETMQ_BROKER_PORT" "$((ROCKETMQ_BROKER_PORT - 2))" "$((ROCKETMQ_BROKER_PORT + 1))"; do
      if port_open "$p"; then
        die "rocketmq: port $p (broker listenPort $ROCKETMQ_BROKER_PORT, -2 or +1) is taken by a process the test bed did not start (pid $(listener_pid "$p" || true)); stop it or set MQC_ROCKETMQ_BROKER_PORT"
      fi
    done
    rm -f "$(rmq_broker_pidfile)"
    rmq_start_broker
    started=1
  fi
  # Each mqadmin call costs 4-7 s, so ask no more than needed:
  # - a route for the smoke topic that names our broker proves both readiness conditions
  #   (broker registered with the name server, topic exists);
  # - a broker just started (and seen registering, above) on a store without the topic cannot
  #   have it: create it at once, then check the route;
  # - otherwise wait for clusterList to show the broker, then create the topic.
  if ((started)) && ! grep -qF "\"$SMOKE_TOPIC\"" "$(rmq_store_dir)/config/topics.json" 2>/dev/null; then
    rmq_ensure_topic "$SMOKE_TOPIC" "$SMOKE_ROCKETMQ_QUEUES" "$TB_TIMEOUT" 1
  elif rmq_topic_routed "$SMOKE_TOPIC" "$SMOKE_ROCKETMQ_QUEUES"; then
    log "rocketmq: broker registered, topic $SMOKE_TOPIC routed to it"
  else
    rmq_wait_registered
    rmq_ensure_topic "$SMOKE_TOPIC" "$SMOKE_ROCKETMQ_QUEUES" "$TB_TIMEOUT" 1
  fi
  if ! grep -qF "\"$EXAMPLE_TOPIC\"" "$(rmq_store_dir)/config/topics.json" 2>/dev/null; then
    rmq_ensure_topic "$EXAMPLE_TOPIC" 4 "$TB_TIMEOUT" 1
  fi
  log "rocketmq: ready (name server $(rmq_namesrv_addr), broker $ROCKETMQ_BROKER_NAME at $(rmq_broker_addr) registered, $SMOKE_TOPIC and $EXAMPLE_TOPIC exist)"
}

# rmq_stop PIDFUNC PORT NAME
rmq_stop() {
  local pidf=$1 port=$2 name=$3 pid
  if pid=$("$pidf"); then
    stop_pid "$pid" "$name" 60
  else
    pid=$(listener_pid "$port" || true)
    [[ -z $pid ]] || warn "rocketmq: port $port is held by pid $pid, which the test bed did not start: left alone"
  fi
}

# rmq_down : the broker's graceful stop takes ~15 s (one service thread after the other), most
# of it after it has unregistered from the name server (its first step), so the name server
# (~6 s to stop) is stopped meanwhile rather than after it.
rmq_down() {
  local job
  rmq_stop rmq_broker_pid "$ROCKETMQ_BROKER_PORT" "rocketmq broker" &
  job=$!
  if rmq_broker_pid >/dev/null || port_open "$ROCKETMQ_BROKER_PORT"; then
    sleep 3
  fi
  rmq_stop rmq_namesrv_pid "$ROCKETMQ_NAMESRV_PORT" "rocketmq name server"
  rm -f "$(rmq_namesrv_pidfile)"
  wait "$job" || true
  rm -f "$(rmq_broker_pidfile)"
}

rmq_status() {
  local pid
  if pid=$(rmq_namesrv_pid); then
    printf '%-18s %-8s port=%-6s pid=%s version=%s\n' rocketmq-namesrv running "$ROCKETMQ_NAMESRV_PORT" "$pid" "$ROCKETMQ_VERSION"
  elif port_open "$ROCKETMQ_NAMESRV_PORT"; then
    printf '%-18s %-8s port=%-6s pid=%s (external: not started by the test bed)\n' rocketmq-namesrv running "$ROCKETMQ_NAMESRV_PORT" "$(listener_pid "$ROCKETMQ_NAMESRV_PORT" || echo '?')"
  else
    printf '%-18s %-8s port=%-6s\n' rocketmq-namesrv stopped "$ROCKETMQ_NAMESRV_PORT"
  fi
  if pid=$(rmq_broker_pid); then
    printf '%-18s %-8s port=%-6s pid=%s name=%s cluster=%s (also ports %s, %s)\n' rocketmq-broker running "$ROCKETMQ_BROKER_PORT" "$pid" \
      "$ROCKETMQ_BROKER_NAME" "$ROCKETMQ_CLUSTER" "$((ROCKETMQ_BROKER_PORT - 2))" "$((ROCKETMQ_BROKER_PORT + 1))"
  elif port_open "$ROCKETMQ_BROKER_PORT"; then
    printf '%-18s %-8s port=%-6s pid=%s (external: not started by the test bed)\n' rocketmq-broker running "$ROCKETMQ_BROKER_PORT" "$(listener_pid "$ROCKETMQ_BROKER_PORT" || echo '?')"
  else
    printf '%-18s %-8s port=%-6s\n' rocketmq-broker stopped "$ROCKETMQ_BROKER_PORT"
  fi
}

# rmq_smoke : send one unique message to mqc-smoke, then read the queue it went to from a
# timestamp just before the send, and look for that exact body.
rmq_smoke() {
  local run body out qid since
  run="$(date +%s%N)-$$"
  body="mqc-smoke-rocketmq-$run"
  since=$(($(date +%s%3N) - 1000))
  port_open "$ROCKETMQ_NAMESRV_PORT" || die "smoke rocketmq: FAILED: no name server on $(rmq_namesrv_addr) (run scripts/testbed up rocketmq)"
  port_open "$ROCKETMQ_BROKER_PORT" || die "smoke rocketmq: FAILED: no broker on $(rmq_broker_addr) (run scripts/testbed up rocketmq)"
  out=$(rmq_admin sendMessage -n "$(rmq_namesrv_addr)" -t "$SMOKE_TOPIC" -p "$body" -k "$body" 2>&1) || true
  qid=$(awk -v b="$ROCKETMQ_BROKER_NAME" '$1==b && $3=="SEND_OK" {print $2}' <<<"$out" | head -n1)
  if [[ ! $qid =~ ^[0-9]+$ ]]; then
    printf '%s\n' "$out" >&2
    die "smoke rocketmq: FAILED: sendMessage to $SMOKE_TOPIC failed"
  fi
  out=$(rmq_admin consumeMessage -n "$(rmq_namesrv_addr)" -t "$SMOKE_TOPIC" -b "$ROCKETMQ_BROKER_NAME" \
    -i "$qid" -s "$since" -c 1000 -g "mqc-smoke-$run" 2>&1) || true
  if ! grep -qF "BODY: $body" <<<"$out"; then
    printf '%s\n' "$out" | tail -n 20 >&2
    die "smoke rocketmq: FAILED: the message sent to $SMOKE_TOPIC (queue $qid) did not come back"
  fi
  log "smoke rocketmq: OK (sent and consumed '$body' via $(rmq_namesrv_addr), queue $qid)"
}
