# shellcheck shell=bash disable=SC2034
# Shared helpers for scripts/testbed. Sourced, never run on its own.
# Expects TB_ROOT (the repository root) to be set by scripts/testbed.

# ---------------------------------------------------------------------------------------------
# Settings (every one can be overridden from the environment)
# ---------------------------------------------------------------------------------------------
TB_SCRIPTS="$TB_ROOT/scripts"
TB_TEMPLATES="$TB_SCRIPTS/testbed.d"
TB_DIR="${MQC_TESTBED_DIR:-$TB_ROOT/.testbed}"
TB_CACHE="${MQC_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/mq-cutover}"
TB_TIMEOUT="${MQC_TESTBED_TIMEOUT:-120}"
# Upper bound for one run of a broker command-line tool.
TB_TOOL_TIMEOUT="${MQC_TESTBED_TOOL_TIMEOUT:-90}"

REDIS_PORT="${MQC_REDIS_PORT:-16379}"
# Three masters, no replicas. The cluster bus port of each node is its port + 10000 (Redis' rule).
REDIS_CLUSTER_PORTS="${MQC_REDIS_CLUSTER_PORTS:-17001 17002 17003}"
REDIS_CLUSTER_PORTS="${REDIS_CLUSTER_PORTS//,/ }"

KAFKA_VERSION="${MQC_KAFKA_VERSION:-4.3.1}"
# log4j-slf4j-impl must match the log4j-core that kafka 4.3.1 brings (2.25.4).
KAFKA_LOG4J_VERSION="${MQC_KAFKA_LOG4J_VERSION:-2.25.4}"
KAFKA_PORT="${MQC_KAFKA_PORT:-19092}"
KAFKA_CONTROLLER_PORT="${MQC_KAFKA_CONTROLLER_PORT:-19093}"
KAFKA_HEAP="${MQC_KAFKA_HEAP:--Xms256m -Xmx768m}"

# 5.5.1 is listed on Maven Central for some modules only (rocketmq-tiered-store), but
# rocketmq-namesrv, -client, -srvutil, -filter, -auth and -tools 5.5.1 are not served:
# 5.3.3 is the newest version verified to resolve whole.
ROCKETMQ_VERSION="${MQC_ROCKETMQ_VERSION:-5.3.3}"
ROCKETMQ_NAMESRV_PORT="${MQC_ROCKETMQ_NAMESRV_PORT:-19876}"
# The broker also listens on BROKER_PORT-2 (fast/VIP channel) and BROKER_PORT+1 (HA).
ROCKETMQ_BROKER_PORT="${MQC_ROCKETMQ_BROKER_PORT:-20911}"
ROCKETMQ_CLUSTER="DefaultCluster"
ROCKETMQ_BROKER_NAME="broker-a"
ROCKETMQ_NAMESRV_HEAP="${MQC_ROCKETMQ_NAMESRV_HEAP:--Xms128m -Xmx256m}"
ROCKETMQ_BROKER_HEAP="${MQC_ROCKETMQ_BROKER_HEAP:--Xms256m -Xmx768m -XX:MaxDirectMemorySize=512m}"

SMOKE_TOPIC="mqc-smoke"
# The topic config/mq-cutover.toml consumes on both brokers, so `mq-cutover run` with the example
# config finds it.
EXAMPLE_TOPIC="reward"
SMOKE_KAFKA_PARTITIONS=1
SMOKE_ROCKETMQ_QUEUES=4

# JVM options for short-lived tool JVMs: start fast, stay small.
TOOL_JVM=(-Xms32m -Xmx256m -XX:TieredStopAtLevel=1 -XX:+UseSerialGC -Xshare:auto
  -Djava.awt.headless=true -Djava.net.preferIPv4Stack=true)

# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------
log() { printf '[testbed %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
warn() { printf '[testbed %(%H:%M:%S)T] WARNING: %s\n' -1 "$*" >&2; }
die() {
  printf '[testbed %(%H:%M:%S)T] ERROR: %s\n' -1 "$*" >&2
  exit 1
}

# show_log FILE... : the last 40 lines of each existing file, on stderr.
show_log() {
  local f
  for f in "$@"; do
    [[ -f $f ]] || continue
    printf '[testbed] ---- last 40 lines of %s ----\n' "$f" >&2
    tail -n 40 "$f" >&2 || true
  done
  printf '[testbed] ----\n' >&2
}

# fail_with_logs MESSAGE FILE... : print the message and the logs, exit 1.
fail_with_logs() {
  local msg=$1
  shift
  printf '[testbed %(%H:%M:%S)T] ERROR: %s\n' -1 "$msg" >&2
  show_log "$@"
  exit 1
}

now_s() { date +%s; }

# ---------------------------------------------------------------------------------------------
# Processes and ports
# ---------------------------------------------------------------------------------------------

# port_open PORT : something accepts TCP connections on 127.0.0.1:PORT.
port_open() {
  (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# pid_alive PID : the process exists and is not a zombie (a daemon that exited stays a zombie
# until whatever adopted it reaps it, which can take seconds in some sandboxes).
pid_alive() {
  [[ -n ${1:-} && $1 =~ ^[0-9]+$ ]] && kill -0 "$1" 2>/dev/null || return 1
  local stat
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 0
  stat=${stat##*) }
  [[ ${stat:0:1} != Z ]]
}

# pid_cmdline PID : the command line, arguments separated by spaces.
pid_cmdline() {
  tr '\0' ' ' <"/proc/$1/cmdline" 2>/dev/null || true
}

# pidfile_pid PIDFILE MARKER : prints the pid recorded in PIDFILE when that process is alive and
# its command line contains MARKER (guards against a recycled pid). Returns 1 otherwise.
pidfile_pid() {
  local file=$1 marker=$2 pid
  [[ -f $file ]] || return 1
  pid=$(tr -dc '0-9' <"$file")
  pid_alive "$pid" || return 1
  [[ $(pid_cmdline "$pid") == *"$marker"* ]] || return 1
  printf '%s\n' "$pid"
}

# our_pid PIDFILE MARKER PORT : like pidfile_pid, but when the pid file is missing or stale,
# the process listening on PORT is taken (and the pid file rewritten) if its command line
# contains MARKER, i.e. it was started by this test bed.
our_pid() {
  local file=$1 marker=$2 port=$3 pid
  if pid=$(pidfile_pid "$file" "$marker"); then
    printf '%s\n' "$pid"
    return 0
  fi
  pid=$(listener_pid "$port" || true)
  if [[ -n $pid ]] && pid_alive "$pid" && [[ $(pid_cmdline "$pid") == *"$marker"* ]]; then
    { printf '%s\n' "$pid" >"$file"; } 2>/dev/null || true
    printf '%s\n' "$pid"
    return 0
  fi
  return 1
}

# listener_pid PORT : pid of the process listening on 127.0.0.1:PORT (needs ss from iproute2).
listener_pid() {
  command -v ss >/dev/null 2>&1 || return 1
  ss -Htlnp "sport = :$1" 2>/dev/null | grep -o 'pid=[0-9]*' | head -n1 | cut -d= -f2
}

# stop_pid PID NAME [GRACE_SECONDS] : SIGTERM, wait, then SIGKILL.
stop_pid() {
  local pid=$1 name=$2 grace=${3:-30} deadline
  pid_alive "$pid" || return 0
  log "stopping $name (pid $pid)"
  kill -TERM "$pid" 2>/dev/null || true
  deadline=$(($(now_s) + grace))
  while pid_alive "$pid"; do
    if (($(now_s) >= deadline)); then
      warn "$name (pid $pid) did not stop within ${grace}s: killing it"
      kill -KILL "$pid" 2>/dev/null || true
      sleep 0.5
      break
    fi
    sleep 0.2
  done
}

# launch PIDFILE LOGFILE CMD... : start CMD detached (own session, stdin from /dev/null, output
# appended to LOGFILE, no inherited lock fd) and record its pid. The pid is written by the
# process itself just before exec, so it is right even when setsid has to fork.
launch() {
  local pidfile=$1 logfile=$2
  shift 2
  rm -f "$pidfile"
  # shellcheck disable=SC2016
  setsid bash -c 'echo $$ >"$1"; shift; exec "$@"' _ "$pidfile" "$@" \
    </dev/null >>"$logfile" 2>&1 9>&- &
  local _
  for _ in $(seq 1 50); do
    [[ -s $pidfile ]] && return 0
    sleep 0.1
  done
  die "could not start: $* (no pid file $pidfile)"
}

# rotate_log FILE : keep one previous generation, start a fresh file.
rotate_log() {
  [[ -f $1 ]] && mv -f "$1" "$1.1"
  : >"$1"
}

# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------

# render TEMPLATE OUT KEY=VALUE... : replace @KEY@ by VALUE (literally) in TEMPLATE, write OUT.
render() {
  local template=$1 out=$2 s kv key val
  shift 2
  s=$(<"$template")
  for kv in "$@"; do
    key=${kv%%=*}
    val=${kv#*=}
    s=${s//"@${key}@"/"$val"}
  done
  if [[ $s == *@[A-Z_]*@* ]] && grep -q '@[A-Z_][A-Z_]*@' <<<"$s"; then
    die "template $template: unreplaced placeholder(s): $(grep -o '@[A-Z_][A-Z_]*@' <<<"$s" | sort -u | tr '\n' ' ')"
  fi
  printf '%s\n' "$s" >"$out.tmp"
  mv -f "$out.tmp" "$out"
}

# take_lock : serialise up/down across concurrent callers (fd 9; children never inherit it).
take_lock() {
  mkdir -p "$TB_DIR"
  exec 9>"$TB_DIR/.lock"
  if ! flock -w 600 9; then
    die "another scripts/testbed up/down holds $TB_DIR/.lock for more than 600 s"
  fi
}

# disk_check DIR : RocketMQ refuses writes above 90 % disk use (diskSpaceWarningLevelRatio).
disk_check() {
  local used
  used=$(df -P "$1" | awk 'NR==2 {gsub("%","",$5); print $5}')
  [[ $used =~ ^[0-9]+$ ]] || return 0
  if ((used >= 90)); then
    die "the disk holding $1 is ${used}% full: the RocketMQ broker refuses writes at 90%; free some space"
  elif ((used >= 85)); then
    warn "the disk holding $1 is ${used}% full (RocketMQ refuses writes at 90%)"
  fi
}

# ---------------------------------------------------------------------------------------------
# Java and Maven
# ---------------------------------------------------------------------------------------------
java_bin() {
  if [[ -n ${MQC_JAVA:-} ]]; then
    printf '%s\n' "$MQC_JAVA"
  elif [[ -n ${JAVA_HOME:-} && -x $JAVA_HOME/bin/java ]]; then
    printf '%s\n' "$JAVA_HOME/bin/java"
  else
    command -v java || die "java not found (run scripts/testbed deps)"
  fi
}

# fetch_jars NAME POM_TEMPLATE KEY=VALUE... : prints the directory holding the jars of that pom.
# The jars are cached under $TB_CACHE/NAME-<hash of the rendered pom>/lib; Maven's own
# repository (~/.m2) makes a refetch after a cache wipe fast too.
fetch_jars() {
  local name=$1 template=$2 hash dir
  shift 2
  mkdir -p "$TB_CACHE"
  local tmp_pom
  tmp_pom=$(mktemp "$TB_CACHE/.pom.XXXXXX")
  render "$template" "$tmp_pom" "$@"
  hash=$(sha256sum "$tmp_pom" | cut -c1-12)
  dir="$TB_CACHE/$name-$hash"
  if [[ -f $dir/.complete ]] && compgen -G "$dir/lib/*.jar" >/dev/null; then
    rm -f "$tmp_pom"
    printf '%s\n' "$dir/lib"
    return 0
  fi
  command -v mvn >/dev/null 2>&1 || die "mvn not found (run scripts/testbed deps)"
  # One fetch at a time per cache (fd 8, released when this command substitution exits).
  exec 8>"$TB_CACHE/.fetch.lock"
  flock -w 900 8 || die "another fetch holds $TB_CACHE/.fetch.lock for more than 900 s"
  if [[ -f $dir/.complete ]] && compgen -G "$dir/lib/*.jar" >/dev/null; then
    rm -f "$tmp_pom"
    printf '%s\n' "$dir/lib"
    return 0
  fi
  log "fetching $name jars with Maven into $dir (first run only; can take a few minutes)"
  rm -rf "$dir.tmp"
  mkdir -p "$dir.tmp"
  mv "$tmp_pom" "$dir.tmp/pom.xml"
  if ! (cd "$dir.tmp" && mvn -B -q -f pom.xml dependency:copy-dependencies \
    -DincludeScope=runtime -DoutputDirectory="$dir.tmp/lib" >"$dir.tmp/mvn.log" 2>&1 </dev/null); then
    fail_with_logs "Maven could not fetch the $name jars (see $dir.tmp/mvn.log)" "$dir.tmp/mvn.log"
  fi
  compgen -G "$dir.tmp/lib/*.jar" >/dev/null || die "Maven fetched no jar for $name (see $dir.tmp/mvn.log)"
  touch "$dir.tmp/.complete"
  rm -rf "$dir"
  mv "$dir.tmp" "$dir"
  printf '%s\n' "$dir/lib"
}

# ---------------------------------------------------------------------------------------------
# TLS material (one CA per test bed)
# ---------------------------------------------------------------------------------------------
tb_tls_dir() { echo "$TB_DIR/tls"; }

# tb_tls_material : makes, once per test bed, a CA and a server certificate it signs, for every
# TLS listener of the test bed: $TB_DIR/tls/{ca.pem,ca.key,server.pem,server.key}. The server
# certificate names IP:127.0.0.1 and DNS:localhost (the brokers advertise and are dialled by
# IP). RSA 2048 and PKCS#8 PEM keys: what netty (RocketMQ), the JDK (Kafka), OpenSSL (Redis)
# and rustls all read. Idempotent: an existing CA is kept (a new one would orphan every
# certificate and trust store made from the old one) and signs a missing server certificate;
# each pair is written under temporary names and renamed, key first.
tb_tls_material() {
  local dir tmp
  dir=$(tb_tls_dir)
  if [[ -s $dir/ca.pem && -s $dir/ca.key && -s $dir/server.pem && -s $dir/server.key ]]; then
    return 0
  fi
  command -v openssl >/dev/null 2>&1 || die "openssl not found (needed for the test bed's TLS certificates)"
  mkdir -p "$dir"
  tmp=$(mktemp -d "$dir/.make.XXXXXX")
  if ! [[ -s $dir/ca.pem && -s $dir/ca.key ]]; then
    openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$tmp/ca.key" 2>/dev/null &&
      openssl req -x509 -new -key "$tmp/ca.key" -sha256 -days 3650 -subj "/CN=mq-cutover test bed CA" \
        -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
        -out "$tmp/ca.pem" 2>/dev/null || {
      rm -rf "$tmp"
      die "tls: openssl could not make the test bed's CA"
    }
    chmod 600 "$tmp/ca.key"
    mv -f "$tmp/ca.key" "$dir/ca.key"
    mv -f "$tmp/ca.pem" "$dir/ca.pem"
    rm -f "$dir/server.pem" "$dir/server.key"
  fi
  printf '%s\n' "basicConstraints=critical,CA:FALSE" \
    "keyUsage=critical,digitalSignature,keyEncipherment" \
    "extendedKeyUsage=serverAuth,clientAuth" \
    "subjectAltName=IP:127.0.0.1,DNS:localhost" >"$tmp/server.ext"
  openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$tmp/server.key" 2>/dev/null &&
    openssl req -new -key "$tmp/server.key" -subj "/CN=localhost" -out "$tmp/server.csr" 2>/dev/null &&
    openssl x509 -req -in "$tmp/server.csr" -CA "$dir/ca.pem" -CAkey "$dir/ca.key" \
      -CAserial "$tmp/ca.srl" -CAcreateserial -sha256 -days 3650 -extfile "$tmp/server.ext" \
      -out "$tmp/server.pem" 2>/dev/null || {
    rm -rf "$tmp"
    die "tls: openssl could not make the test bed's server certificate"
  }
  chmod 600 "$tmp/server.key"
  mv -f "$tmp/server.key" "$dir/server.key"
  mv -f "$tmp/server.pem" "$dir/server.pem"
  rm -rf "$tmp"
  log "tls: CA and server certificate (IP:127.0.0.1, DNS:localhost) in $dir"
}
