# shellcheck shell=bash
# Redis single node and Redis Cluster for scripts/testbed. Sourced, never run on its own.
#
# Both use Debian's redis-server (7.0 on Debian 12), bound to 127.0.0.1, with persistence off
# (--save "" --appendonly no), daemonized with a pid file under .testbed/.
# A server already answering PING on a port without our pid file (for example one started by
# hand) is adopted: `up` leaves it alone and `status` reports it as external; `down` stops it
# with `redis-cli shutdown nosave`, as that is the only way to identify and stop it.
# A daemonized redis-server that has exited can stay a zombie for seconds (until whatever
# adopted it reaps it), so "stopped" is judged by pid_alive (zombies count as dead), not kill -0.

redis_cli() { redis-cli -h 127.0.0.1 "$@"; }

# redis_ping PORT
redis_ping() {
  [[ $(timeout 5 redis-cli -h 127.0.0.1 -p "$1" ping 2>/dev/null) == PONG ]]
}

redis_server_pid() { # PORT : pid reported by the server itself
  timeout 5 redis-cli -h 127.0.0.1 -p "$1" info server 2>/dev/null | tr -d '\r' |
    awk -F: '$1=="process_id" {print $2}'
}

# redis_start_node DIR PORT EXTRA_ARGS... : start one daemonized redis-server and wait for PING.
redis_start_node() {
  local dir=$1 port=$2
  shift 2
  mkdir -p "$dir"
  rm -f "$dir/redis.pid"
  rotate_log "$dir/redis.log"
  # The daemonizing parent returns at once; fd 9 (the lock) must not leak into the daemon.
  redis-server --bind 127.0.0.1 --port "$port" --protected-mode yes \
    --save "" --appendonly no --dir "$dir" \
    --daemonize yes --pidfile "$dir/redis.pid" --logfile "$dir/redis.log" \
    "$@" </dev/null >/dev/null 2>&1 9>&- ||
    fail_with_logs "redis-server on port $port did not start" "$dir/redis.log"
}

# redis_wait_ping PORT LOGFILE
redis_wait_ping() {
  local port=$1 logfile=$2 deadline
  deadline=$(($(now_s) + TB_TIMEOUT))
  until redis_ping "$port"; do
    (($(now_s) < deadline)) || fail_with_logs "redis on 127.0.0.1:$port does not answer PING after ${TB_TIMEOUT}s" "$logfile"
    sleep 0.1
  done
}

# redis_node_state DIR PORT : prints "ours PID", "external PID", "stopped" or "busy" (port taken
# by something that does not answer PING).
redis_node_state() {
  local dir=$1 port=$2 pid
  if pid=$(pidfile_pid "$dir/redis.pid" "redis-server") && redis_ping "$port"; then
    echo "ours $pid"
  elif redis_ping "$port"; then
    echo "external $(redis_server_pid "$port")"
  elif port_open "$port"; then
    echo "busy"
  else
    echo "stopped"
  fi
}

# redis_stop_node DIR PORT NAME
redis_stop_node() {
  local dir=$1 port=$2 name=$3 pid
  if pid=$(pidfile_pid "$dir/redis.pid" "redis-server"); then
    stop_pid "$pid" "$name" 20
  elif redis_ping "$port"; then
    log "stopping $name on port $port (no pid file of ours: redis-cli shutdown nosave)"
    redis_cli -p "$port" shutdown nosave >/dev/null 2>&1 || true
    local i
    for i in $(seq 1 100); do
      port_open "$port" || break
      sleep 0.1
    done
  fi
  rm -f "$dir/redis.pid"
}

# ----------------------------------------------------------------------------- single node ---
redis_dir() { echo "$TB_DIR/redis"; }

redis_up() {
  local dir state
  dir=$(redis_dir)
  state=$(redis_node_state "$dir" "$REDIS_PORT")
  case $state in
    ours*) log "redis: already running on 127.0.0.1:$REDIS_PORT (pid ${state#ours })" ;;
    external*) log "redis: a server not started by the test bed already answers on 127.0.0.1:$REDIS_PORT (pid ${state#external }): using it" ;;
    busy) die "redis: port $REDIS_PORT is taken by something that does not answer Redis PING (set MQC_REDIS_PORT)" ;;
    stopped)
      log "redis: starting on 127.0.0.1:$REDIS_PORT"
      redis_start_node "$dir" "$REDIS_PORT"
      redis_wait_ping "$REDIS_PORT" "$dir/redis.log"
      ;;
  esac
  redis_ping "$REDIS_PORT" || fail_with_logs "redis on 127.0.0.1:$REDIS_PORT does not answer PING" "$dir/redis.log"
  log "redis: ready (PING) on 127.0.0.1:$REDIS_PORT"
}

redis_down() {
  redis_stop_node "$(redis_dir)" "$REDIS_PORT" "redis"
}

redis_status() {
  local state
  state=$(redis_node_state "$(redis_dir)" "$REDIS_PORT")
  case $state in
    ours*) printf '%-18s %-8s port=%-6s pid=%s\n' redis running "$REDIS_PORT" "${state#ours }" ;;
    external*) printf '%-18s %-8s port=%-6s pid=%s (external: not started by the test bed)\n' redis running "$REDIS_PORT" "${state#external }" ;;
    busy) printf '%-18s %-8s port=%-6s (port taken by something that is not Redis)\n' redis stopped "$REDIS_PORT" ;;
    *) printf '%-18s %-8s port=%-6s\n' redis stopped "$REDIS_PORT" ;;
  esac
}

redis_smoke() {
  local key="mqc:testbed:smoke:$$:$RANDOM" val got
  val="v-$(date +%s%N)"
  redis_ping "$REDIS_PORT" || die "smoke redis: FAILED: no Redis answers on 127.0.0.1:$REDIS_PORT (run scripts/testbed up redis)"
  redis_cli -p "$REDIS_PORT" set "$key" "$val" ex 60 >/dev/null
  got=$(redis_cli -p "$REDIS_PORT" get "$key")
  redis_cli -p "$REDIS_PORT" del "$key" >/dev/null
  [[ $got == "$val" ]] || die "smoke redis: FAILED: SET/GET on 127.0.0.1:$REDIS_PORT returned '$got', expected '$val'"
  log "smoke redis: OK (SET/GET on 127.0.0.1:$REDIS_PORT)"
}

# ---------------------------------------------------------------------------------- cluster ---
cluster_dir() { echo "$TB_DIR/cluster"; }

# cluster_info_field PORT FIELD
cluster_info_field() {
  timeout 5 redis-cli -h 127.0.0.1 -p "$1" cluster info 2>/dev/null | tr -d '\r' |
    awk -F: -v f="$2" '$1==f {print $2}'
}

# cluster_ok : every node answers, says cluster_state:ok, knows all nodes, all slots assigned.
cluster_ok() {
  local port n
  n=$(wc -w <<<"$REDIS_CLUSTER_PORTS")
  for port in $REDIS_CLUSTER_PORTS; do
    [[ $(cluster_info_field "$port" cluster_state) == ok ]] || return 1
    [[ $(cluster_info_field "$port" cluster_known_nodes) == "$n" ]] || return 1
    [[ $(cluster_info_field "$port" cluster_slots_assigned) == 16384 ]] || return 1
  done
}

# cluster_is_blank : every node is alone and holds no slot (ready for --cluster create).
cluster_is_blank() {
  local port
  for port in $REDIS_CLUSTER_PORTS; do
    [[ $(cluster_info_field "$port" cluster_known_nodes) == 1 ]] || return 1
    [[ $(cluster_info_field "$port" cluster_slots_assigned) == 0 ]] || return 1
    [[ $(redis_cli -p "$port" dbsize 2>/dev/null) == 0 ]] || return 1
  done
}

cluster_start_nodes() {
  local port dir state
  for port in $REDIS_CLUSTER_PORTS; do
    dir="$(cluster_dir)/$port"
    state=$(redis_node_state "$dir" "$port")
    case $state in
      ours* | external*) ;;
      busy) die "redis cluster: port $port is taken by something that does not answer Redis PING (set MQC_REDIS_CLUSTER_PORTS)" ;;
      stopped)
        log "redis cluster: starting node 127.0.0.1:$port (bus port $((port + 10000)))"
        redis_start_node "$dir" "$port" --cluster-enabled yes --cluster-config-file nodes.conf \
          --cluster-node-timeout 5000 --cluster-require-full-coverage yes \
          --cluster-announce-ip 127.0.0.1
        ;;
    esac
  done
  for port in $REDIS_CLUSTER_PORTS; do
    redis_wait_ping "$port" "$(cluster_dir)/$port/redis.log"
    [[ $(timeout 5 redis-cli -h 127.0.0.1 -p "$port" info cluster 2>/dev/null | tr -d '\r' | awk -F: '$1=="cluster_enabled" {print $2}') == 1 ]] ||
      die "redis cluster: the server on 127.0.0.1:$port is not in cluster mode (started by someone else?)"
  done
}

# cluster_wait_ok SECONDS : true once cluster_ok holds, false after SECONDS.
cluster_wait_ok() {
  local deadline
  deadline=$(($(now_s) + $1))
  until cluster_ok; do
    (($(now_s) < deadline)) || return 1
    sleep 0.5
  done
}

cluster_all_ours() {
  local port
  for port in $REDIS_CLUSTER_PORTS; do
    [[ $(redis_node_state "$(cluster_dir)/$port" "$port") == ours* ]] || return 1
  done
}

cluster_create() {
  local port addrs=()
  for port in $REDIS_CLUSTER_PORTS; do addrs+=("127.0.0.1:$port"); done
  log "redis cluster: creating (${addrs[*]}, no replicas)"
  local out
  if ! out=$(redis-cli --cluster create "${addrs[@]}" --cluster-replicas 0 --cluster-yes </dev/null 2>&1); then
    printf '%s\n' "$out" >&2
    die "redis cluster: redis-cli --cluster create failed"
  fi
}

cluster_logs() {
  local port
  for port in $REDIS_CLUSTER_PORTS; do echo "$(cluster_dir)/$port/redis.log"; done
}

cluster_up() {
  cluster_start_nodes
  if cluster_ok; then
    log "redis cluster: ready (cluster_state:ok) on ports ${REDIS_CLUSTER_PORTS// /,}"
    return 0
  fi
  if ! cluster_is_blank; then
    # Nodes restarted with their nodes.conf need a few seconds to find each other again.
    if cluster_wait_ok 20; then
      log "redis cluster: ready (cluster_state:ok) on ports ${REDIS_CLUSTER_PORTS// /,}"
      return 0
    fi
    if cluster_all_ours; then
      warn "redis cluster: the nodes do not form a healthy cluster (stale state): wiping and recreating"
      cluster_down
      rm -rf "$(cluster_dir)"
      cluster_start_nodes
    else
      # shellcheck disable=SC2046
      fail_with_logs "redis cluster: nodes on ${REDIS_CLUSTER_PORTS// /,} do not form a healthy cluster, and some were not started by the test bed: stop them (scripts/testbed down cluster) and retry" $(cluster_logs)
    fi
  fi
  cluster_create
  # shellcheck disable=SC2046
  cluster_wait_ok "$TB_TIMEOUT" ||
    fail_with_logs "redis cluster: not cluster_state:ok ${TB_TIMEOUT}s after creation" $(cluster_logs)
  log "redis cluster: ready (cluster_state:ok) on ports ${REDIS_CLUSTER_PORTS// /,}"
}

cluster_down() {
  local port
  for port in $REDIS_CLUSTER_PORTS; do
    redis_stop_node "$(cluster_dir)/$port" "$port" "redis cluster node $port"
  done
}

cluster_status() {
  local port state running=0 stopped=0 pids=() ext="" n
  n=$(wc -w <<<"$REDIS_CLUSTER_PORTS")
  for port in $REDIS_CLUSTER_PORTS; do
    state=$(redis_node_state "$(cluster_dir)/$port" "$port")
    case $state in
      ours*) running=$((running + 1)) pids+=("${state#ours }") ;;
      external*) running=$((running + 1)) pids+=("${state#external }") ext=" (external: not started by the test bed)" ;;
      *) stopped=$((stopped + 1)) pids+=("-") ;;
    esac
  done
  local ports=${REDIS_CLUSTER_PORTS// /,} p=${pids[*]}
  if ((running == n)); then
    local st
    st=$(cluster_info_field "${REDIS_CLUSTER_PORTS%% *}" cluster_state)
    printf '%-18s %-8s port=%-6s pid=%s cluster_state=%s%s\n' redis-cluster running "$ports" "${p// /,}" "${st:-?}" "$ext"
  elif ((running == 0)); then
    printf '%-18s %-8s port=%-6s\n' redis-cluster stopped "$ports"
  else
    printf '%-18s %-8s port=%-6s pid=%s (%d of %d nodes up)\n' redis-cluster degraded "$ports" "${p// /,}" "$running" "$n"
  fi
}

cluster_smoke() {
  local first=${REDIS_CLUSTER_PORTS%% *} i key val got
  cluster_ok || die "smoke redis cluster: FAILED: the cluster on ${REDIS_CLUSTER_PORTS// /,} is down or not ok (run scripts/testbed up cluster)"
  # Keys spread over the slots reach every master (-c follows MOVED redirections).
  for i in 1 2 3 4 5 6; do
    key="mqc:testbed:smoke:$$:$i:$RANDOM"
    val="v-$i-$(date +%s%N)"
    redis-cli -c -h 127.0.0.1 -p "$first" set "$key" "$val" ex 60 >/dev/null
    got=$(redis-cli -c -h 127.0.0.1 -p "$first" get "$key")
    redis-cli -c -h 127.0.0.1 -p "$first" del "$key" >/dev/null
    [[ $got == "$val" ]] || die "smoke redis cluster: FAILED: SET/GET of $key returned '$got', expected '$val'"
  done
  log "smoke redis cluster: OK (SET/GET across slots, cluster_state:ok)"
}

# ------------------------------------------------------------------------------- redis-tls ---
# Redis with TLS only (no plaintext port) on 127.0.0.1:$REDIS_TLS_PORT, the test bed's server
# certificate, client certificates optional (verified against the test bed's CA when given), and
# ACL: the default user off, user $REDIS_TLS_USER with the password in $TB_DIR/tls/redis-tls.secret.
redis_tls_dir() { echo "$TB_DIR/redis-tls"; }

# redis_tls_cli ARGS... : redis-cli over TLS as the ACL user.
redis_tls_cli() {
  local tls
  tls=$(tb_tls_dir)
  REDISCLI_AUTH="$(tb_secret redis-tls)" timeout 5 redis-cli -h 127.0.0.1 -p "$REDIS_TLS_PORT" \
    --tls --cacert "$tls/ca.pem" --user "$REDIS_TLS_USER" "$@"
}

redis_tls_ping() {
  [[ -s "$(tb_tls_dir)/ca.pem" ]] || return 1
  [[ $(redis_tls_cli ping 2>/dev/null) == PONG ]]
}

redis_tls_pid() { pidfile_pid "$(redis_tls_dir)/redis.pid" "redis-server"; }

redis_tls_up() {
  local dir tls pid deadline
  dir=$(redis_tls_dir)
  if pid=$(redis_tls_pid) && redis_tls_ping; then
    log "redis-tls: already running on 127.0.0.1:$REDIS_TLS_PORT (pid $pid)"
    return 0
  fi
  [[ -z ${pid:-} ]] || stop_pid "$pid" "redis-tls" 20
  port_open "$REDIS_TLS_PORT" && die "redis-tls: port $REDIS_TLS_PORT is taken by a process the test bed did not start (set MQC_REDIS_TLS_PORT)"
  tb_tls_material
  tls=$(tb_tls_dir)
  mkdir -p "$dir"
  # The users are in a config file (there is no --user flag); it holds a password: mode 600.
  (
    umask 077
    printf '%s\n' "user default off" \
      "user $REDIS_TLS_USER on >$(tb_secret redis-tls) ~* &* +@all" >"$dir/redis.conf"
  )
  rm -f "$dir/redis.pid"
  rotate_log "$dir/redis.log"
  log "redis-tls: starting on 127.0.0.1:$REDIS_TLS_PORT (TLS only, ACL user $REDIS_TLS_USER)"
  redis-server "$dir/redis.conf" --bind 127.0.0.1 --port 0 --tls-port "$REDIS_TLS_PORT" \
    --tls-cert-file "$tls/server.pem" --tls-key-file "$tls/server.key" \
    --tls-ca-cert-file "$tls/ca.pem" --tls-auth-clients optional \
    --save "" --appendonly no --dir "$dir" \
    --daemonize yes --pidfile "$dir/redis.pid" --logfile "$dir/redis.log" \
    </dev/null >/dev/null 2>&1 9>&- ||
    fail_with_logs "redis-tls did not start" "$dir/redis.log"
  deadline=$(($(now_s) + TB_TIMEOUT))
  until redis_tls_ping; do
    (($(now_s) < deadline)) || fail_with_logs "redis-tls on 127.0.0.1:$REDIS_TLS_PORT does not answer PING over TLS after ${TB_TIMEOUT}s" "$dir/redis.log"
    sleep 0.1
  done
  log "redis-tls: ready (PING over TLS as $REDIS_TLS_USER) on 127.0.0.1:$REDIS_TLS_PORT"
}

redis_tls_down() {
  local pid
  if pid=$(redis_tls_pid); then
    stop_pid "$pid" "redis-tls" 20
  fi
  rm -f "$(redis_tls_dir)/redis.pid"
}

redis_tls_status() {
  local pid
  if pid=$(redis_tls_pid) && redis_tls_ping; then
    printf '%-18s %-8s port=%-6s pid=%s tls user=%s\n' redis-tls running "$REDIS_TLS_PORT" "$pid" "$REDIS_TLS_USER"
  elif [[ -n ${pid:-} ]]; then
    printf '%-18s %-8s port=%-6s pid=%s (process up, no PING over TLS)\n' redis-tls starting "$REDIS_TLS_PORT" "$pid"
  else
    printf '%-18s %-8s port=%-6s\n' redis-tls stopped "$REDIS_TLS_PORT"
  fi
}

redis_tls_smoke() {
  local key="mqc:testbed:smoke:$$:$RANDOM" val got
  val="v-$(date +%s%N)"
  redis_tls_ping || die "smoke redis-tls: FAILED: no PING over TLS on 127.0.0.1:$REDIS_TLS_PORT (run scripts/testbed up redis-tls)"
  redis_tls_cli set "$key" "$val" ex 60 >/dev/null
  got=$(redis_tls_cli get "$key")
  redis_tls_cli del "$key" >/dev/null
  [[ $got == "$val" ]] || die "smoke redis-tls: FAILED: SET/GET returned '$got', expected '$val'"
  # Without credentials the server must refuse (the default user is off).
  if [[ $(timeout 5 redis-cli -h 127.0.0.1 -p "$REDIS_TLS_PORT" --tls --cacert "$(tb_tls_dir)/ca.pem" ping 2>&1) == PONG ]]; then
    die "smoke redis-tls: FAILED: PING without credentials was answered"
  fi
  log "smoke redis-tls: OK (SET/GET over TLS as $REDIS_TLS_USER; anonymous PING refused)"
}
