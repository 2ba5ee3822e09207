#!/usr/bin/env bash
# The local stack dreamraid runs and is tested against: a 6-node Redis Cluster
# (3 masters, 3 replicas) and a MariaDB instance, on loopback, with their data
# under var/ (or $DREAMRAID_VAR).  Addresses come from conf/dreamraid.ini (or
# $DREAMRAID_CONFIG).  It reuses only servers working in its own data
# directory; a port held by anything else stops it with one line naming that.
#
#   scripts/stack.sh up            install what is missing, start or reuse everything
#   scripts/stack.sh ensure        like up, then print "started" or "reused" on stdout
#   scripts/stack.sh down          stop what is running from var/
#   scripts/stack.sh status        exit 0 when everything answers
#   scripts/stack.sh mysql-stop    stop MariaDB only (fault tests)
#   scripts/stack.sh mysql-start   start MariaDB only
#   scripts/stack.sh reset         down, then delete var/redis and var/mysql
set -euo pipefail

# The daemons started here must not inherit a caller's open files: a test
# run under flock(1) that restarts MariaDB would otherwise leave the lock
# held by mariadbd for as long as it runs.
for fd in /proc/$$/fd/*; do
    fd=${fd##*/}
    [ "$fd" -gt 2 ] 2>/dev/null && [ "$fd" -lt 255 ] && eval "exec $fd>&-" 2>/dev/null || true
done

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# Relative paths are taken from the current directory (the checkout, under make).
VAR=$(realpath -m -- "${DREAMRAID_VAR:-$ROOT/var}")
PY=${PYTHON:-$ROOT/.venv/bin/python}
CONFIG=$(realpath -m -- "${DREAMRAID_CONFIG:-$ROOT/conf/dreamraid.ini}")
PACKAGES=(redis-server redis-tools mariadb-server mariadb-client)

say() { printf 'stack: %s\n' "$*" >&2; }
die() { say "$*"; exit 1; }

eval "$(cd "$ROOT" && "$PY" -m dreamraid.config shell "$CONFIG")"
read -r -a NODES <<<"$REDIS_NODES"
[ "${#NODES[@]}" -eq 6 ] || die "redis.startup_nodes must list 6 nodes for the local cluster, it lists ${#NODES[@]}"

MYSQL_DIR=$VAR/mysql
MYSQL_SOCK=$MYSQL_DIR/mysqld.sock
MYSQL_PID=$MYSQL_DIR/mysqld.pid
[ "${#MYSQL_SOCK}" -le 107 ] || die "DREAMRAID_VAR $VAR is too long a path: MariaDB's socket $MYSQL_SOCK would pass the 107-byte limit"

# -- whose ports ----------------------------------------------------------------
# A server is this stack's when it works in this stack's data directory:
# redis-server runs in $VAR/redis/PORT, mariadbd in $VAR/mysql/data.

# Exit 0 when something listens on TCP port $1 (any address).
port_taken() {
    local hex
    hex=$(printf ':%04X' "$1")
    awk -v port="$hex" '$4 == "0A" && substr($2, length($2) - 4) == port { found = 1 } END { exit !found }' \
        /proc/net/tcp /proc/net/tcp6 2>/dev/null
}

# The pid listening on TCP port $1, when this user can see it.
port_pid() {
    local hex inode fd
    hex=$(printf ':%04X' "$1")
    for inode in $(awk -v port="$hex" '$4 == "0A" && substr($2, length($2) - 4) == port { print $10 }' \
        /proc/net/tcp /proc/net/tcp6 2>/dev/null); do
        fd=$(find /proc/[0-9]*/fd -maxdepth 1 -lname "socket:\[$inode\]" -print -quit 2>/dev/null) || true
        [ -n "$fd" ] || continue
        fd=${fd#/proc/}
        echo "${fd%%/*}"
        return 0
    done
    return 1
}

ours() { local dir; dir=$(readlink "/proc/$1/cwd" 2>/dev/null) && [[ "$dir/" == "$VAR/"* ]]; }

# Exit 0 when process $1 has exited: gone, or a zombie its parent (init,
# for these daemons) has not reaped yet.
exited() {
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 0
    stat=${stat##*) }
    [ "${stat%% *}" = Z ]
}

# Exit 0 when no port of this stack (Redis, their cluster bus ports, MariaDB)
# is held by anything but this stack's own servers; else say, in one line,
# who holds which, and where that other stack lives.
ports_ours() {
    local node port pid dir who
    for port in $(for node in "${NODES[@]}"; do echo "${node##*:}" $((${node##*:} + 10000)); done) "$MYSQL_PORT"; do
        port_taken "$port" || continue
        pid=$(port_pid "$port") || pid=
        [ -n "$pid" ] && ours "$pid" && continue
        if [ -z "$pid" ]; then
            who="a process this user cannot see"
        else
            dir=$(readlink "/proc/$pid/cwd" 2>/dev/null) || dir=
            case "$dir" in
                */redis/[0-9]*) who="$(cat "/proc/$pid/comm") (pid $pid) of the stack in ${dir%/redis/*}" ;;
                */mysql/data) who="$(cat "/proc/$pid/comm") (pid $pid) of the stack in ${dir%/mysql/data}" ;;
                *) who="$(cat "/proc/$pid/comm" 2>/dev/null) (pid $pid, working in ${dir:-?})" ;;
            esac
        fi
        say "port $port is taken by $who, not by this stack ($VAR), so it is not reused;" \
            "to run a stack beside it, give this one other ports and its own data directory:" \
            "DREAMRAID_CONFIG=conf/examples/second-stack.ini DREAMRAID_VAR=var-2 make test (docs/operations.md, \"Two stacks side by side\")"
        return 1
    done
}

# -- packages -------------------------------------------------------------------

ensure_packages() {
    local missing=()
    command -v redis-server >/dev/null || missing+=(redis-server)
    command -v redis-cli >/dev/null || missing+=(redis-tools)
    command -v mariadbd >/dev/null || [ -x /usr/sbin/mariadbd ] || missing+=(mariadb-server)
    command -v mariadb >/dev/null || missing+=(mariadb-client)
    [ "${#missing[@]}" -eq 0 ] && return 0
    if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
        die "missing ${missing[*]}; install the Debian packages: sudo apt-get install -y ${PACKAGES[*]}"
    fi
    say "installing ${missing[*]} from Debian's packages"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2 || die "apt-get update failed; install ${PACKAGES[*]} by hand"
    apt-get install -y -qq "${missing[@]}" >&2 || die "apt-get install failed; install ${PACKAGES[*]} by hand"
}

mariadbd_bin() { command -v mariadbd || echo /usr/sbin/mariadbd; }

# -- redis ----------------------------------------------------------------------

rcli() { local node=$1; shift; redis-cli -h "${node%:*}" -p "${node##*:}" "$@"; }
node_dir() { echo "$VAR/redis/${1##*:}"; }
node_up() { [ "$(rcli "$1" ping 2>/dev/null)" = PONG ]; }
cluster_ok() {
    local node
    for node in "${NODES[@]}"; do
        rcli "$node" cluster info 2>/dev/null | grep -q '^cluster_state:ok' || return 1
        [ "$(rcli "$node" cluster info 2>/dev/null | sed -n 's/^cluster_known_nodes:\([0-9]*\).*/\1/p')" = 6 ] || return 1
    done
}
wait_for() { # seconds, command...
    local deadline=$((SECONDS + $1)); shift
    until "$@"; do
        [ $SECONDS -lt $deadline ] || return 1
        sleep 0.2
    done
}

start_redis_node() {
    local node=$1 dir
    dir=$(node_dir "$node")
    node_up "$node" && return 0
    mkdir -p "$dir"
    cat >"$dir/redis.conf" <<EOF
bind ${node%:*}
port ${node##*:}
dir $dir
daemonize yes
pidfile $dir/redis.pid
logfile $dir/redis.log
cluster-enabled yes
cluster-config-file nodes.conf
cluster-node-timeout 5000
cluster-require-full-coverage no
appendonly yes
appendfsync everysec
save ""
EOF
    redis-server "$dir/redis.conf" || die "redis-server on $node did not start; see $dir/redis.log"
}

all_nodes_up() {
    local node
    for node in "${NODES[@]}"; do node_up "$node" || return 1; done
}

redis_up() {
    local node fresh=0
    if all_nodes_up && cluster_ok; then
        say "redis cluster up (already running)"
        return 0
    fi
    for node in "${NODES[@]}"; do
        [ -f "$(node_dir "$node")/nodes.conf" ] || fresh=1
        start_redis_node "$node"
    done
    for node in "${NODES[@]}"; do
        wait_for 20 node_up "$node" || die "redis $node does not answer; see $(node_dir "$node")/redis.log"
    done
    if [ $fresh = 0 ] && wait_for 30 cluster_ok; then
        say "redis cluster up (reused)"
        return 0
    fi
    if [ $fresh = 0 ]; then
        say "redis cluster did not come back healthy; recreating it (its data is lost)"
        redis_down
        for node in "${NODES[@]}"; do rm -rf "$(node_dir "$node")"; start_redis_node "$node"; done
        for node in "${NODES[@]}"; do wait_for 20 node_up "$node" || die "redis $node does not answer"; done
    fi
    redis-cli --cluster create "${NODES[@]}" --cluster-replicas 1 --cluster-yes >"$VAR/redis/create.log" 2>&1 ||
        die "redis-cli --cluster create failed; see $VAR/redis/create.log"
    wait_for 30 cluster_ok || die "redis cluster did not reach cluster_state:ok"
    say "redis cluster up (created: 3 masters, 3 replicas)"
}

redis_down() {
    local node dir pid
    for node in "${NODES[@]}"; do
        dir=$(node_dir "$node")
        [ -f "$dir/redis.pid" ] || continue
        pid=$(cat "$dir/redis.pid")
        # A stale pidfile (after a reboot) may name someone else's process,
        # and the port may be another stack's: stop only our own node.
        if ours "$pid"; then
            if [ "$(port_pid "${node##*:}")" = "$pid" ]; then
                rcli "$node" shutdown >/dev/null 2>&1 || kill "$pid" 2>/dev/null || true
            else
                kill "$pid" 2>/dev/null || true
            fi
            # A node that was SIGSTOPped by a test is resumed so it can exit.
            kill -CONT "$pid" 2>/dev/null || true
            wait_for 10 exited "$pid" || kill -9 "$pid" 2>/dev/null || true
        fi
        rm -f "$dir/redis.pid"
    done
}

redis_status() {
    local node
    for node in "${NODES[@]}"; do node_up "$node" || { say "redis $node down"; return 1; }; done
    cluster_ok || { say "redis cluster not healthy"; return 1; }
}

# -- mariadb --------------------------------------------------------------------

msql() { mariadb --no-defaults --user=root --socket="$MYSQL_SOCK" "$@"; }
mysql_up_now() { [ -S "$MYSQL_SOCK" ] && msql -e 'SELECT 1' >/dev/null 2>&1; }
mysql_user_ok() {
    mariadb --no-defaults --host="$MYSQL_HOST" --port="$MYSQL_PORT" --user="$MYSQL_USER" \
        --password="$MYSQL_PASSWORD" -e 'SELECT 1' "$MYSQL_DATABASE" >/dev/null 2>&1
}

mysql_start() {
    mysql_up_now && return 0
    mkdir -p "$MYSQL_DIR"
    if [ ! -d "$MYSQL_DIR/data/mysql" ]; then
        mariadb-install-db --no-defaults --user="$(id -un)" --datadir="$MYSQL_DIR/data" \
            --auth-root-authentication-method=socket --skip-test-db >"$MYSQL_DIR/install.log" 2>&1 ||
            die "mariadb-install-db failed; see $MYSQL_DIR/install.log"
    fi
    rm -f "$MYSQL_SOCK"
    # A session of its own: a test that restarts it is killed without taking it along.
    setsid nohup "$(mariadbd_bin)" --no-defaults --user="$(id -un)" --datadir="$MYSQL_DIR/data" \
        --socket="$MYSQL_SOCK" --pid-file="$MYSQL_PID" --bind-address="$MYSQL_HOST" \
        --port="$MYSQL_PORT" --log-error="$MYSQL_DIR/error.log" --skip-name-resolve \
        --innodb-buffer-pool-size=256M --max-connections=500 >/dev/null 2>&1 &
    wait_for 60 mysql_up_now || die "MariaDB did not start; see $MYSQL_DIR/error.log"
}

mysql_provision() {
    msql <<EOF
CREATE DATABASE IF NOT EXISTS \`$MYSQL_DATABASE\` CHARACTER SET utf8mb4 COLLATE utf8mb4_bin;
CREATE USER IF NOT EXISTS '$MYSQL_USER'@'$MYSQL_HOST' IDENTIFIED BY '$MYSQL_PASSWORD';
CREATE USER IF NOT EXISTS '$MYSQL_USER'@'localhost' IDENTIFIED BY '$MYSQL_PASSWORD';
ALTER USER '$MYSQL_USER'@'$MYSQL_HOST' IDENTIFIED BY '$MYSQL_PASSWORD';
ALTER USER '$MYSQL_USER'@'localhost' IDENTIFIED BY '$MYSQL_PASSWORD';
GRANT ALL PRIVILEGES ON \`${MYSQL_DATABASE}%\`.* TO '$MYSQL_USER'@'$MYSQL_HOST';
GRANT ALL PRIVILEGES ON \`${MYSQL_DATABASE}%\`.* TO '$MYSQL_USER'@'localhost';
EOF
    migrate
    mysql_user_ok || die "cannot log in to MariaDB as $MYSQL_USER at $MYSQL_HOST:$MYSQL_PORT"
}

migrate() {
    "$PY" -m dreamraid.admin --config "$CONFIG" migrate >&2 || die "applying conf/schema.sql failed"
}

mysql_stop() {
    [ -f "$MYSQL_PID" ] || return 0
    local pid
    pid=$(cat "$MYSQL_PID")
    if ours "$pid"; then
        kill "$pid" 2>/dev/null || true
        wait_for 60 exited "$pid" || kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$MYSQL_PID"
}

# -- commands -------------------------------------------------------------------

up() {
    ports_ours || exit 1
    ensure_packages
    mkdir -p "$VAR/redis"
    redis_up
    mysql_start
    mysql_provision
    say "mariadb up at $MYSQL_HOST:$MYSQL_PORT, database $MYSQL_DATABASE"
}

status() { redis_status && mysql_up_now && mysql_user_ok; }

case "${1:-}" in
    up) up ;;
    ensure)
        ports_ours || exit 1
        if status >/dev/null 2>&1; then migrate; echo reused; else up; echo started; fi ;;
    down) redis_down; mysql_stop; say "stopped" ;;
    status) ports_ours || exit 1; if status; then say "up"; else say "down"; exit 1; fi ;;
    mysql-stop) mysql_stop ;;
    mysql-start) ports_ours || exit 1; mysql_start ;;
    reset) redis_down; mysql_stop; rm -rf "$VAR/redis" "$MYSQL_DIR"; say "reset" ;;
    *) sed -n '2,15s/^# \{0,1\}//p' "$0" >&2; exit 2 ;;
esac
