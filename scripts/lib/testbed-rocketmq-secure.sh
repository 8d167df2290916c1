# shellcheck shell=bash
# A secured Apache RocketMQ 5.3.3 for scripts/testbed: its own name server and broker, beside
# the plain ones (other ports, other store), with ACL 2.0 on and TLS enforced on every remoting
# port. Sourced, never run on its own; uses the jars, `launch`, `our_pid` and the wait helpers
# of the plain component (testbed-rocketmq.sh) and the test bed's CA (tb_tls_material).
#
# Verified against the 5.3.3 jars:
# - TLS is switched by JVM system properties (org.apache.rocketmq.remoting.netty.TlsSystemConfig):
#   tls.server.mode=enforcing refuses plaintext connections; tls.test.mode.enable defaults to
#   true (a self-signed certificate made at start), so it is set false and tls.server.certPath /
#   tls.server.keyPath (PKCS#8 PEM, as netty wants) name the test bed's certificate;
#   tls.enable=true makes the broker's own client (its registration with the name server) and
#   mqadmin speak TLS, tls.client.authServer + tls.client.trustCertPath make them check it;
# - ACL 2.0 lives in broker.conf (org.apache.rocketmq.auth.config.AuthConfig; see
#   rocketmq-secure-broker.conf.in); the name server does not authenticate;
# - mqadmin signs its requests with accessKey / secretKey from ${rocketmq.home.dir}/conf/tools.yml
#   (MQAdminStartup -> AclUtils.getAclRPCHook); ACL 2.0 takes them as user name and password;
# - users and ACLs (createUser, createAcl) are kept by the broker in its store (RocksDB under
#   config/), so they are made once per store.

ROCKETMQ_SECURE_NAMESRV_PORT="${MQC_ROCKETMQ_SECURE_NAMESRV_PORT:-29876}"
# The broker also listens on BROKER_PORT-2 (fast channel) and BROKER_PORT+1 (HA).
ROCKETMQ_SECURE_BROKER_PORT="${MQC_ROCKETMQ_SECURE_BROKER_PORT:-30911}"
ROCKETMQ_SECURE_CLUSTER="SecureCluster"
ROCKETMQ_SECURE_BROKER_NAME="broker-s"
# Test-bed-only credentials (loopback, throw-away data): the super user mqadmin signs with, and
# the user the tests consume and produce as (Pub and Sub on every topic and group).
ROCKETMQ_SECURE_ADMIN_USER="mqc-admin"
ROCKETMQ_SECURE_ADMIN_PASSWORD="mqc-admin-secret"
ROCKETMQ_SECURE_USER="mqc"
ROCKETMQ_SECURE_PASSWORD="mqc-secret"
ROCKETMQ_SECURE_NAMESRV_HEAP="${MQC_ROCKETMQ_SECURE_NAMESRV_HEAP:--Xms64m -Xmx192m}"
ROCKETMQ_SECURE_BROKER_HEAP="${MQC_ROCKETMQ_SECURE_BROKER_HEAP:--Xms192m -Xmx512m -XX:MaxDirectMemorySize=256m}"

rmqs_dir() { echo "$TB_DIR/rocketmq-secure"; }
rmqs_namesrv_addr() { echo "127.0.0.1:$ROCKETMQ_SECURE_NAMESRV_PORT"; }
rmqs_broker_addr() { echo "127.0.0.1:$ROCKETMQ_SECURE_BROKER_PORT"; }
rmqs_namesrv_pidfile() { echo "$(rmqs_dir)/namesrv.pid"; }
rmqs_broker_pidfile() { echo "$(rmqs_dir)/broker.pid"; }
rmqs_namesrv_out() { echo "$(rmqs_dir)/logs/namesrv.out"; }
rmqs_broker_out() { echo "$(rmqs_dir)/logs/broker.out"; }
rmqs_namesrv_conf() { echo "$(rmqs_dir)/namesrv.conf"; }
rmqs_broker_conf() { echo "$(rmqs_dir)/broker.conf"; }
rmqs_namesrv_log() { echo "$(rmqs_dir)/namesrv/logs/rocketmqlogs/namesrv.log"; }
rmqs_broker_log() { echo "$(rmqs_dir)/broker/logs/rocketmqlogs/broker.log"; }

# rmqs_store_dir : like rmq_store_dir (tmpfs when there is room, the choice recorded), in a
# directory of its own.
rmqs_store_dir() {
  local record chosen shm_free
  record="$(rmqs_dir)/store-dir"
  if [[ -s $record ]]; then
    chosen=$(cat "$record")
    if [[ -d $(dirname "$chosen") ]]; then
      printf '%s\n' "$chosen"
      return 0
    fi
  fi
  chosen="$(rmqs_dir)/broker/store"
  if [[ $(stat -f -c %T /dev/shm 2>/dev/null) == tmpfs && -w /dev/shm ]]; then
    shm_free=$(df -P -k /dev/shm | awk 'NR==2 {print $4}')
    if [[ $shm_free =~ ^[0-9]+$ ]] && ((shm_free >= 2 * 1024 * 1024)); then
      chosen="/dev/shm/mq-cutover-$(printf '%s' "$TB_DIR" | cksum | cut -d' ' -f1)/rocketmq-secure-store"
    fi
  fi
  mkdir -p "$(rmqs_dir)" "$(dirname "$chosen")"
  printf '%s\n' "$chosen" >"$record"
  printf '%s\n' "$chosen"
}

rmqs_purge() {
  local store
  if [[ -s $(rmqs_dir)/store-dir ]]; then
    store=$(cat "$(rmqs_dir)/store-dir")
    rm -rf "$store"
  fi
  rm -rf "$(rmqs_dir)"
}

# The JVM properties of the TLS side: the server enforcing TLS with the test bed's certificate,
# the process's own client (broker -> name server, mqadmin) speaking TLS and checking the CA.
rmqs_tls_opts() {
  local tls
  tls=$(tb_tls_dir)
  printf '%s\n' -Dtls.server.mode=enforcing -Dtls.test.mode.enable=false \
    "-Dtls.server.certPath=$tls/server.pem" "-Dtls.server.keyPath=$tls/server.key" \
    -Dtls.server.need.client.auth=none -Dtls.enable=true \
    -Dtls.client.authServer=true "-Dtls.client.trustCertPath=$tls/ca.pem" \
    "-Dtls.config.file=$(rmqs_dir)/no-tls.properties"
}

rmqs_namesrv_pid() { our_pid "$(rmqs_namesrv_pidfile)" "$(rmqs_namesrv_conf)" "$ROCKETMQ_SECURE_NAMESRV_PORT"; }
rmqs_broker_pid() { our_pid "$(rmqs_broker_pidfile)" "$(rmqs_broker_conf)" "$ROCKETMQ_SECURE_BROKER_PORT"; }

# rmqs_admin SUBCOMMAND ARGS... : mqadmin over TLS, signed as the super user.
rmqs_admin() {
  local lib java dir tls_opts
  lib=$(rmq_lib) || exit 1
  java=$(java_bin)
  dir=$(rmqs_dir)
  mkdir -p "$dir/tools-home/conf" "$dir/tools"
  # Written once and renamed into place: tests create topics in parallel, and a half-written
  # file would leave a call unsigned.
  if [[ ! -s $dir/tools-home/conf/tools.yml ]]; then
    printf 'accessKey: %s\nsecretKey: %s\n' "$ROCKETMQ_SECURE_ADMIN_USER" "$ROCKETMQ_SECURE_ADMIN_PASSWORD" \
      >"$dir/tools-home/conf/tools.yml.$$"
    mv -f "$dir/tools-home/conf/tools.yml.$$" "$dir/tools-home/conf/tools.yml"
  fi
  mapfile -t tls_opts < <(rmqs_tls_opts)
  timeout -k 5 "$TB_TOOL_TIMEOUT" "$java" "${TOOL_JVM[@]}" "${RMQ_OPENS[@]}" "${tls_opts[@]}" \
    -Drocketmq.home.dir="$dir/tools-home" -Duser.home="$dir/tools" \
    -Drmq.logback.configurationFile=rmq.tools.logback.xml \
    -cp "$lib/*" org.apache.rocketmq.tools.command.MQAdminStartup "$@"
}

rmqs_render_configs() {
  local dir store
  dir=$(rmqs_dir)
  store=$(rmqs_store_dir)
  mkdir -p "$dir/home" "$dir/logs" "$dir/namesrv" "$dir/broker" "$dir/tools" "$store"
  render "$TB_TEMPLATES/rocketmq-namesrv.conf.in" "$(rmqs_namesrv_conf)" \
    "NAMESRV_PORT=$ROCKETMQ_SECURE_NAMESRV_PORT"
  render "$TB_TEMPLATES/rocketmq-secure-broker.conf.in" "$(rmqs_broker_conf)" \
    "CLUSTER=$ROCKETMQ_SECURE_CLUSTER" "BROKER_NAME=$ROCKETMQ_SECURE_BROKER_NAME" \
    "NAMESRV_PORT=$ROCKETMQ_SECURE_NAMESRV_PORT" "BROKER_PORT=$ROCKETMQ_SECURE_BROKER_PORT" \
    "STORE_DIR=$store" "ADMIN_USER=$ROCKETMQ_SECURE_ADMIN_USER" \
    "ADMIN_PASSWORD=$ROCKETMQ_SECURE_ADMIN_PASSWORD"
}

rmqs_start_namesrv() {
  local dir lib java tls_opts
  dir=$(rmqs_dir)
  lib=$(rmq_lib) || exit 1
  java=$(java_bin)
  mapfile -t tls_opts < <(rmqs_tls_opts)
  rotate_log "$(rmqs_namesrv_out)"
  log "rocketmq-secure: starting name server $ROCKETMQ_VERSION on $(rmqs_namesrv_addr) (TLS only)"
  # shellcheck disable=SC2086
  ROCKETMQ_HOME="$dir/home" launch "$(rmqs_namesrv_pidfile)" "$(rmqs_namesrv_out)" \
    "$java" $ROCKETMQ_SECURE_NAMESRV_HEAP -XX:+UseG1GC -XX:-OmitStackTraceInFastThrow "${RMQ_OPENS[@]}" \
    "${tls_opts[@]}" -Djava.awt.headless=true -Djava.net.preferIPv4Stack=true \
    -Drocketmq.home.dir="$dir/home" -Duser.home="$dir/namesrv" \
    -Drmq.logback.configurationFile=rmq.namesrv.logback.xml \
    -cp "$lib/*" org.apache.rocketmq.namesrv.NamesrvStartup -c "$(rmqs_namesrv_conf)"
  rmq_wait_line "$(rmqs_namesrv_out)" "The Name Server boot success" rmqs_namesrv_pid "secured name server" \
    "$(rmqs_namesrv_out)" "$(rmqs_namesrv_log)"
}

rmqs_start_broker() {
  local dir lib java offset tls_opts deadline
  dir=$(rmqs_dir)
  lib=$(rmq_lib) || exit 1
  java=$(java_bin)
  mapfile -t tls_opts < <(rmqs_tls_opts)
  rotate_log "$(rmqs_broker_out)"
  offset=$(stat -c %s "$(rmqs_broker_log)" 2>/dev/null || echo 0)
  log "rocketmq-secure: starting broker $ROCKETMQ_SECURE_BROKER_NAME on $(rmqs_broker_addr) (TLS only, ACL 2.0)"
  # shellcheck disable=SC2086
  ROCKETMQ_HOME="$dir/home" launch "$(rmqs_broker_pidfile)" "$(rmqs_broker_out)" \
    "$java" $ROCKETMQ_SECURE_BROKER_HEAP -XX:+UseG1GC -XX:G1HeapRegionSize=16m -XX:G1ReservePercent=25 \
    -XX:InitiatingHeapOccupancyPercent=30 -XX:SoftRefLRUPolicyMSPerMB=0 -XX:-OmitStackTraceInFastThrow \
    "${RMQ_OPENS[@]}" "${tls_opts[@]}" -Djava.awt.headless=true -Djava.net.preferIPv4Stack=true \
    -Drocketmq.home.dir="$dir/home" -Duser.home="$dir/broker" \
    -Drmq.logback.configurationFile=rmq.broker.logback.xml \
    -cp "$lib/*" org.apache.rocketmq.broker.BrokerStartup -c "$(rmqs_broker_conf)" -n "$(rmqs_namesrv_addr)"
  rmq_wait_line "$(rmqs_broker_out)" "The broker[$ROCKETMQ_SECURE_BROKER_NAME, $(rmqs_broker_addr)] boot success" \
    rmqs_broker_pid "secured broker" "$(rmqs_broker_out)" "$(rmqs_broker_log)"
  deadline=$(($(now_s) + TB_TIMEOUT))
  until tail -c +$((offset + 1)) "$(rmqs_broker_log)" 2>/dev/null |
    grep -qF "Registering current broker to name server completed"; do
    rmqs_broker_pid >/dev/null || fail_with_logs "rocketmq-secure: the broker exited during startup" "$(rmqs_broker_out)" "$(rmqs_broker_log)"
    (($(now_s) < deadline)) || fail_with_logs "rocketmq-secure: the broker did not register with the name server within ${TB_TIMEOUT}s (TLS between them?)" "$(rmqs_broker_log)" "$(rmqs_namesrv_log)"
    sleep 0.3
  done
  log "rocketmq-secure: broker registered with the name server"
}

# rmqs_ensure_topic NAME QUEUES [WAIT_SECONDS] : create (or resize) a topic on the secured
# cluster as the super user; see rmq_ensure_topic.
rmqs_ensure_topic() {
  local name=$1 queues=$2 wait=${3:-30} out deadline
  [[ $queues =~ ^[1-9][0-9]*$ ]] || die "rocketmq-secure: queues must be a positive integer, not '$queues'"
  deadline=$(($(now_s) + wait))
  while :; do
    out=$(rmqs_admin updateTopic -n "$(rmqs_namesrv_addr)" -c "$ROCKETMQ_SECURE_CLUSTER" -t "$name" \
      -r "$queues" -w "$queues" 2>&1) || true
    grep -qF "create topic to $(rmqs_broker_addr) success" <<<"$out" && break
    if (($(now_s) >= deadline)); then
      printf '%s\n' "$out" | tail -n 20 >&2
      die "rocketmq-secure: updateTopic $name failed (is it up? scripts/testbed up rocketmq-secure; logs: scripts/testbed logs rocketmq-secure)"
    fi
    sleep 1
  done
  log "rocketmq-secure: topic $name ready ($queues queues)"
}

# rmqs_ensure_users : the tests' user with Pub, Sub and Get on every topic and group (a consumer
# needs Get on its topic too: the min / max offset requests are Get, and a lite pull consumer
# asks for the min offset of a queue its group never committed), made once per store (the
# marker lives in the store, so a new store gets them again).
rmqs_ensure_users() {
  local marker out deadline
  marker="$(rmqs_store_dir)/.mqc-users-v2"
  [[ -f $marker ]] && return 0
  deadline=$(($(now_s) + TB_TIMEOUT))
  while :; do
    out=$(rmqs_admin createUser -n "$(rmqs_namesrv_addr)" -c "$ROCKETMQ_SECURE_CLUSTER" \
      -u "$ROCKETMQ_SECURE_USER" -p "$ROCKETMQ_SECURE_PASSWORD" -t Normal 2>&1) || true
    if grep -qiE "success|already exist|user is existed" <<<"$out"; then break; fi
    if (($(now_s) >= deadline)); then
      printf '%s\n' "$out" | tail -n 20 >&2
      die "rocketmq-secure: createUser $ROCKETMQ_SECURE_USER failed"
    fi
    sleep 1
  done
  out=$(rmqs_admin createAcl -n "$(rmqs_namesrv_addr)" -c "$ROCKETMQ_SECURE_CLUSTER" \
    -s "User:$ROCKETMQ_SECURE_USER" -r "Topic:*,Group:*" -a "Pub,Sub,Get" -d Allow 2>&1) || true
  if grep -qiE "already exist|is existed" <<<"$out"; then
    out=$(rmqs_admin updateAcl -n "$(rmqs_namesrv_addr)" -c "$ROCKETMQ_SECURE_CLUSTER" \
      -s "User:$ROCKETMQ_SECURE_USER" -r "Topic:*,Group:*" -a "Pub,Sub,Get" -d Allow 2>&1) || true
  fi
  if ! grep -qi "success" <<<"$out"; then
    printf '%s\n' "$out" | tail -n 20 >&2
    die "rocketmq-secure: createAcl for $ROCKETMQ_SECURE_USER failed"
  fi
  touch "$marker"
  log "rocketmq-secure: user $ROCKETMQ_SECURE_USER may publish, subscribe and read offsets on every topic and group"
}

rmqs_up() {
  local pid started=0 p
  tb_tls_material
  rmqs_render_configs
  if pid=$(rmqs_namesrv_pid); then
    log "rocketmq-secure: name server already running (pid $pid)"
  else
    if port_open "$ROCKETMQ_SECURE_NAMESRV_PORT"; then
      die "rocketmq-secure: port $ROCKETMQ_SECURE_NAMESRV_PORT is taken by a process the test bed did not start (pid $(listener_pid "$ROCKETMQ_SECURE_NAMESRV_PORT" || true)); stop it or set MQC_ROCKETMQ_SECURE_NAMESRV_PORT"
    fi
    rmqs_start_namesrv
  fi
  if pid=$(rmqs_broker_pid); then
    log "rocketmq-secure: broker already running (pid $pid)"
  else
    for p in "$ROCKETMQ_SECURE_BROKER_PORT" "$((ROCKETMQ_SECURE_BROKER_PORT - 2))" "$((ROCKETMQ_SECURE_BROKER_PORT + 1))"; do
      if port_open "$p"; then
        die "rocketmq-secure: port $p (broker listenPort $ROCKETMQ_SECURE_BROKER_PORT, -2 or +1) is taken by a process the test bed did not start (pid $(listener_pid "$p" || true)); stop it or set MQC_ROCKETMQ_SECURE_BROKER_PORT"
      fi
    done
    rmqs_start_broker
    started=1
  fi
  rmqs_ensure_users
  if ((started)) || ! grep -qF "\"$SMOKE_TOPIC\"" "$(rmqs_store_dir)/config/topics.json" 2>/dev/null; then
    rmqs_ensure_topic "$SMOKE_TOPIC" "$SMOKE_ROCKETMQ_QUEUES" "$TB_TIMEOUT"
  fi
  log "rocketmq-secure: ready (name server $(rmqs_namesrv_addr), broker $ROCKETMQ_SECURE_BROKER_NAME at $(rmqs_broker_addr); TLS only, ACL user $ROCKETMQ_SECURE_USER)"
}

rmqs_down() {
  local job
  rmq_stop rmqs_broker_pid "$ROCKETMQ_SECURE_BROKER_PORT" "rocketmq-secure broker" &
  job=$!
  if rmqs_broker_pid >/dev/null || port_open "$ROCKETMQ_SECURE_BROKER_PORT"; then
    sleep 3
  fi
  rmq_stop rmqs_namesrv_pid "$ROCKETMQ_SECURE_NAMESRV_PORT" "rocketmq-secure name server"
  rm -f "$(rmqs_namesrv_pidfile)"
  wait "$job" || true
  rm -f "$(rmqs_broker_pidfile)"
}

rmqs_status() {
  local pid
  if pid=$(rmqs_namesrv_pid); then
    printf '%-18s %-8s port=%-6s pid=%s version=%s tls=enforcing\n' rocketmq-secure-namesrv running "$ROCKETMQ_SECURE_NAMESRV_PORT" "$pid" "$ROCKETMQ_VERSION"
  elif port_open "$ROCKETMQ_SECURE_NAMESRV_PORT"; then
    printf '%-18s %-8s port=%-6s pid=%s (external: not started by the test bed)\n' rocketmq-secure-namesrv running "$ROCKETMQ_SECURE_NAMESRV_PORT" "$(listener_pid "$ROCKETMQ_SECURE_NAMESRV_PORT" || echo '?')"
  else
    printf '%-18s %-8s port=%-6s\n' rocketmq-secure-namesrv stopped "$ROCKETMQ_SECURE_NAMESRV_PORT"
  fi
  if pid=$(rmqs_broker_pid); then
    printf '%-18s %-8s port=%-6s pid=%s name=%s cluster=%s tls=enforcing acl=2.0 (also ports %s, %s)\n' rocketmq-secure-broker running "$ROCKETMQ_SECURE_BROKER_PORT" "$pid" \
      "$ROCKETMQ_SECURE_BROKER_NAME" "$ROCKETMQ_SECURE_CLUSTER" "$((ROCKETMQ_SECURE_BROKER_PORT - 2))" "$((ROCKETMQ_SECURE_BROKER_PORT + 1))"
  elif port_open "$ROCKETMQ_SECURE_BROKER_PORT"; then
    printf '%-18s %-8s port=%-6s pid=%s (external: not started by the test bed)\n' rocketmq-secure-broker running "$ROCKETMQ_SECURE_BROKER_PORT" "$(listener_pid "$ROCKETMQ_SECURE_BROKER_PORT" || echo '?')"
  else
    printf '%-18s %-8s port=%-6s\n' rocketmq-secure-broker stopped "$ROCKETMQ_SECURE_BROKER_PORT"
  fi
}

# rmqs_smoke : one unique message sent and read back over TLS, signed as the super user.
rmqs_smoke() {
  local run body out qid since
  run="$(date +%s%N)-$$"
  body="mqc-smoke-rocketmq-secure-$run"
  since=$(($(date +%s%3N) - 1000))
  port_open "$ROCKETMQ_SECURE_NAMESRV_PORT" || die "smoke rocketmq-secure: FAILED: no name server on $(rmqs_namesrv_addr) (run scripts/testbed up rocketmq-secure)"
  out=$(rmqs_admin sendMessage -n "$(rmqs_namesrv_addr)" -t "$SMOKE_TOPIC" -p "$body" -k "$body" 2>&1) || true
  qid=$(awk -v b="$ROCKETMQ_SECURE_BROKER_NAME" '$1==b && $3=="SEND_OK" {print $2}' <<<"$out" | head -n1)
  if [[ ! $qid =~ ^[0-9]+$ ]]; then
    printf '%s\n' "$out" >&2
    die "smoke rocketmq-secure: FAILED: sendMessage to $SMOKE_TOPIC failed"
  fi
  out=$(rmqs_admin consumeMessage -n "$(rmqs_namesrv_addr)" -t "$SMOKE_TOPIC" -b "$ROCKETMQ_SECURE_BROKER_NAME" \
    -i "$qid" -s "$since" -c 1000 -g "mqc-smoke-$run" 2>&1) || true
  if ! grep -qF "BODY: $body" <<<"$out"; then
    printf '%s\n' "$out" | tail -n 20 >&2
    die "smoke rocketmq-secure: FAILED: the message sent to $SMOKE_TOPIC (queue $qid) did not come back"
  fi
  log "smoke rocketmq-secure: OK (sent and consumed '$body' over TLS via $(rmqs_namesrv_addr), queue $qid)"
}
