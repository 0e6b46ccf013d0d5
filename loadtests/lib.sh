# Shared functions of the dso load tests. Sourced by run.sh and smoke.sh; not run alone.
#
# Everything listens on 127.0.0.1 only, every loop is bounded, and every process started
# here is recorded in $LT_PIDS and stopped by lt_cleanup (installed as an EXIT trap).

set -euo pipefail

LT_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
LT_REPO=$(cd "$LT_ROOT/.." && pwd)
LT_PIDS=()
LT_PG_DIRS=()
LT_MY_DIRS=()
: "${LT_SCRATCH:=$(mktemp -d /tmp/dso-lt.XXXXXX)}"
chmod 755 "$LT_SCRATCH"
: "${DSO_LOAD:=$LT_REPO/target/release/dso-load}"
# The proxy under test: `agent` (default) runs the real `dso agent` and steers it with the
# `dso proxy` commands, as an operator would; `library` runs `dso-load proxy`, the same
# dso-proxy library behind a line-based control port (kept for A/B runs of the data path).
: "${LT_DRIVER:=agent}"
: "${DSO_BIN:=$LT_REPO/target/release/dso}"
PG_BIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)

lt_log() { printf '%s %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }

# Installs what is missing from Debian's packages (uses .ci/services.sh when it exists).
lt_install() {
    if [[ -f "$LT_REPO/.ci/services.sh" ]]; then
        # shellcheck source=/dev/null
        source "$LT_REPO/.ci/services.sh"
        declare -F ensure_postgres >/dev/null && ensure_postgres
        declare -F ensure_loadtools >/dev/null && ensure_loadtools
        [[ "${1:-}" == all ]] && declare -F ensure_mariadb >/dev/null && ensure_mariadb
    fi
    local want=()
    [[ -n "$PG_BIN" && -x "$PG_BIN/initdb" ]] || want+=(postgresql postgresql-contrib)
    command -v pgbench >/dev/null || want+=(postgresql-contrib)
    command -v curl >/dev/null || want+=(curl)
    if [[ "${1:-}" == all ]]; then
        command -v haproxy >/dev/null || want+=(haproxy)
        command -v socat >/dev/null || want+=(socat)
        command -v iperf3 >/dev/null || want+=(iperf3)
        command -v mariadbd >/dev/null || want+=(mariadb-server)
        command -v mariadb >/dev/null || want+=(mariadb-client)
        command -v sysbench >/dev/null || want+=(sysbench)
    fi
    if ((${#want[@]})); then
        lt_log "installing ${want[*]}"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${want[@]}" >/dev/null
    fi
    PG_BIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
}

# Builds the load driver (release: every measurement is of an optimized build).
lt_build() {
    if [[ -z "${LT_NO_BUILD:-}" ]]; then
        (cd "$LT_REPO" && cargo build --release -q -p dso-loadtests -p dso-cli)
    fi
}

lt_cleanup() {
    local pid
    for pid in "${LT_PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${LT_PIDS[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    local d
    for d in "${LT_PG_DIRS[@]}"; do
        runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$d" -m immediate stop >/dev/null 2>&1 || true
    done
    for d in "${LT_MY_DIRS[@]}"; do
        [[ -f "$d/pid" ]] && kill "$(cat "$d/pid")" 2>/dev/null || true
    done
    sleep 0.5
    [[ -n "${LT_KEEP_SCRATCH:-}" ]] || rm -rf "$LT_SCRATCH"
}

# A free TCP port on loopback (asked of the kernel, then released).
lt_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# Waits until something accepts on 127.0.0.1:$1 (at most $2 seconds, default 20).
lt_wait_port() {
    local i
    for ((i = 0; i < ${2:-20} * 10; i++)); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.1
    done
    lt_log "nothing accepts on port $1"
    return 1
}

# Starts dso in front of BACKEND_ADDR: lt_dso NAME LISTEN_PORT BACKEND_ADDR [--drain-ms N]
# [--hold-max-ms N]. Sets DSO_PID_<NAME> (and DSO_CTL_<NAME> for the library driver).
# Every control command is logged to $LT_SCRATCH/events-NAME.csv (epoch_us,event,detail).
lt_dso() {
    if [[ $LT_DRIVER == library ]]; then
        lt_dso_library "$@"
        return
    fi
    local name=$1 port=$2 backend=$3
    shift 3
    local drain_ms=30000 hold_ms=30000
    while (($#)); do
        case $1 in
        --drain-ms) drain_ms=$2 ;;
        --hold-max-ms) hold_ms=$2 ;;
        *) lt_log "lt_dso: unknown option $1"; return 1 ;;
        esac
        shift 2
    done
    local cfg="$LT_SCRATCH/dso-$name.yaml" sock="$LT_SCRATCH/dso-$name.sock"
    cat >"$cfg" <<YAML
agent:
  socket: $sock
  shutdown_timeout: 5s
proxy:
  listeners:
    - name: lt
      listen: 127.0.0.1:$port
      backends: [$backend]
      drain_timeout: ${drain_ms}ms
      hold_max: ${hold_ms}ms
YAML
    echo "epoch_us,event,detail" >"$LT_SCRATCH/events-$name.csv"
    RUST_LOG=warn "$DSO_BIN" agent --no-docker --config "$cfg" >"$LT_SCRATCH/dso-$name.log" 2>&1 &
    LT_PIDS+=($!)
    printf -v "DSO_PID_$name" '%s' "$!"
    local i
    for ((i = 0; i < 200; i++)); do
        "$DSO_BIN" --socket "$sock" proxy status >/dev/null 2>&1 && break
        sleep 0.1
    done
    lt_wait_port "$port" || { tail -n 20 "$LT_SCRATCH/dso-$name.log" >&2; return 1; }
    lt_event "$name" start "127.0.0.1:$port"
}

lt_event() { # lt_event NAME EVENT DETAIL
    printf '%s,%s,%s\n' "$(date +%s%6N)" "$2" "$3" >>"$LT_SCRATCH/events-$1.csv"
}

# Sends one control command: lt_ctl NAME COMMAND [ARGS]; prints the reply. Commands:
# `swap ADDR[,ADDR...] [DRAIN_MS]`, `pause [MAX_MS]`, `resume`, `stats` (JSON), `quit`.
lt_ctl() {
    if [[ $LT_DRIVER == library ]]; then
        lt_ctl_library "$@"
        return
    fi
    local name=$1 cmd=$2
    shift 2
    local sock="$LT_SCRATCH/dso-$name.sock" out
    local dso=("$DSO_BIN" --socket "$sock")
    case $cmd in
    swap)
        local addrs drain=()
        IFS=, read -r -a addrs <<<"$1"
        [[ -n "${2:-}" ]] && drain=(--drain "${2}ms")
        out=$("${dso[@]}" proxy swap lt "${addrs[@]}" "${drain[@]}" 2>&1) || { echo "error: $out"; return 1; }
        lt_event "$name" swap "$1"
        ;;
    pause)
        out=$("${dso[@]}" proxy pause lt ${1:+--max "${1}ms"} 2>&1) || { echo "error: $out"; return 1; }
        lt_event "$name" pause "max_ms=${1:-}"
        ;;
    resume)
        out=$("${dso[@]}" proxy resume lt 2>&1) || { echo "error: $out"; return 1; }
        lt_event "$name" resume ""
        ;;
    stats)
        # The listener's snapshot (counters flattened at the top level: failed, ...).
        curl -sf --unix-socket "$sock" http://localhost/v1/proxy/listeners/lt || { echo "error: no stats"; return 1; }
        echo
        return 0
        ;;
    quit)
        local pid="DSO_PID_$name"
        kill -TERM "${!pid}" 2>/dev/null || true
        lt_event "$name" stop ""
        out=ok
        ;;
    *) echo "error: unknown command $cmd"; return 1 ;;
    esac
    echo "ok"
}

# The library driver: `dso-load proxy` with a line-based control port on loopback.
lt_dso_library() {
    local name=$1 port=$2 backend=$3
    shift 3
    local ctl
    ctl=$(lt_port)
    "$DSO_LOAD" proxy --listen "127.0.0.1:$port" --backend "$backend" \
        --control "127.0.0.1:$ctl" --events "$LT_SCRATCH/events-$name.csv" --max-seconds 1800 "$@" \
        >"$LT_SCRATCH/dso-$name.log" 2>&1 &
    LT_PIDS+=($!)
    printf -v "DSO_PID_$name" '%s' "$!"
    printf -v "DSO_CTL_$name" '%s' "$ctl"
    lt_wait_port "$ctl"
}

lt_ctl_library() {
    local var="DSO_CTL_$1"
    shift
    local reply
    exec 7<>"/dev/tcp/127.0.0.1/${!var}"
    printf '%s\n' "$*" >&7
    IFS= read -r reply <&7 || true
    exec 7>&- 7<&-
    printf '%s\n' "$reply"
    [[ "$reply" == ok* || "$reply" == "{"* ]]
}

# Stops a dso instance started by lt_dso.
lt_dso_stop() {
    lt_ctl "$1" quit >/dev/null || true
    local pid="DSO_PID_$1"
    wait "${!pid}" 2>/dev/null || true
}

# HAProxy in tcp mode: lt_haproxy LISTEN_PORT BACKEND_ADDR [MAXCONN]
lt_haproxy() {
    local cfg="$LT_SCRATCH/haproxy-$1.cfg"
    cat >"$cfg" <<CFG
global
    maxconn ${3:-4096}
    nbthread 2
defaults
    mode tcp
    timeout connect 5s
    timeout client 1h
    timeout server 1h
listen lt
    bind 127.0.0.1:$1
    server s1 $2
CFG
    haproxy -f "$cfg" -db >"$LT_SCRATCH/haproxy-$1.log" 2>&1 &
    LT_PIDS+=($!)
    HAPROXY_PID=$!
    lt_wait_port "$1"
}

# socat forwarding: lt_socat LISTEN_PORT BACKEND_HOST:PORT
lt_socat() {
    socat "TCP-LISTEN:$1,bind=127.0.0.1,reuseaddr,fork" "TCP:$2" >/dev/null 2>&1 &
    LT_PIDS+=($!)
    SOCAT_PID=$!
    lt_wait_port "$1"
}

# A private PostgreSQL (trust auth, loopback only) with pgbench data:
# lt_pg_init DIR PORT SCALE; later instances can copy DIR (lt_pg_clone) instead of
# initialising again.
lt_pg_init() {
    local dir=$1 port=$2 scale=${3:-1}
    mkdir -p "$dir" && chown postgres:postgres "$dir"
    runuser -u postgres -- "$PG_BIN/initdb" -D "$dir" -A trust -U postgres >/dev/null
    lt_pg_start "$dir" "$port"
    runuser -u postgres -- "$PG_BIN/pgbench" -h 127.0.0.1 -p "$port" -U postgres -i -s "$scale" -q postgres >/dev/null 2>&1
}

lt_pg_start() {
    local dir=$1 port=$2
    LT_PG_DIRS+=("$dir")
    runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$dir" -l "$dir/server.log" -w -t 60 \
        -o "-p $port -k $dir -c listen_addresses=127.0.0.1 -c max_connections=200 -c shared_buffers=128MB -c fsync=off -c synchronous_commit=off" \
        start >/dev/null
}

lt_pg_stop() {
    runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$1" -m "${2:-fast}" -w stop >/dev/null
}

# Copies a stopped cluster: lt_pg_clone FROM TO
lt_pg_clone() {
    cp -a "$1" "$2"
    rm -f "$2/postmaster.pid"
}

# pgbench as the postgres user against 127.0.0.1:PORT; remaining args go to pgbench.
lt_pgbench() {
    local port=$1
    shift
    runuser -u postgres -- "$PG_BIN/pgbench" -h 127.0.0.1 -p "$port" -U postgres "$@" postgres
}

# Extracts figures from pgbench's output file: prints "tps failed aborted lat_ms".
lt_pgbench_figures() {
    python3 - "$1" <<'PY'
import re, sys
t = open(sys.argv[1]).read()
def f(p, d="0"):
    m = re.search(p, t)
    return m.group(1) if m else d
tps = f(r"tps = ([0-9.]+) \(without initial connection time\)", f(r"tps = ([0-9.]+)"))
failed = f(r"number of failed transactions: (\d+)")
aborted = str(len(re.findall(r"client \d+ aborted", t)))
lat = f(r"latency average = ([0-9.]+) ms")
print(tps, failed, aborted, lat)
PY
}

trap lt_cleanup EXIT

# Appends one raw figure to the run's CSV: lt_row SCENARIO TARGET ROUND METRIC VALUE
lt_row() {
    printf '%s,%s,%s,%s,%s\n' "$1" "$2" "$3" "$4" "$5" >>"$LT_CSV"
}

# A private MariaDB (no grant tables: any user connects, like trust auth) on loopback:
# lt_my_init DIR PORT
lt_my_init() {
    local dir=$1 port=$2
    mkdir -p "$dir" && chown mysql:mysql "$dir"
    mariadb-install-db --user=mysql --datadir="$dir/data" --auth-root-authentication-method=normal \
        --skip-test-db >"$dir/install.log" 2>&1
    lt_my_start "$dir" "$port"
}

lt_my_start() {
    local dir=$1 port=$2
    LT_MY_DIRS+=("$dir")
    runuser -u mysql -- mariadbd --no-defaults --datadir="$dir/data" --port="$port" \
        --bind-address=127.0.0.1 --socket="$dir/sock" --pid-file="$dir/pid" --skip-grant-tables \
        --max-connections=300 --innodb-buffer-pool-size=128M --innodb-flush-log-at-trx-commit=0 \
        --skip-log-bin --log-error="$dir/error.log" &
    LT_PIDS+=($!)
    lt_wait_port "$port" 60
}

lt_my_stop() {
    local dir=$1
    [[ -f "$dir/pid" ]] || return 0
    local pid
    pid=$(cat "$dir/pid")
    kill "$pid" 2>/dev/null || true
    local i
    for ((i = 0; i < 300; i++)); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
}

# Resident set size of a process, in KiB.
lt_rss_kib() {
    awk '/^VmRSS:/ {print $2}' "/proc/$1/status"
}

# Swaps listener NAME between two backends every PERIOD seconds, COUNT times, with drain
# DRAIN_MS: lt_swap_loop NAME ADDR_A ADDR_B PERIOD COUNT DRAIN_MS. Run it in the background.
lt_swap_loop() {
    local name=$1 a=$2 b=$3 period=$4 count=$5 drain=$6 i
    for ((i = 1; i <= count; i++)); do
        sleep "$period"
        if ((i % 2)); then lt_ctl "$name" swap "$b" "$drain" >/dev/null; else lt_ctl "$name" swap "$a" "$drain" >/dev/null; fi
    done
}

# CPU time of process $1 in clock ticks (getconf CLK_TCK per second): utime + stime of all
# its threads, plus cutime + cstime of the children it has reaped (socat forks one child
# per connection). Fields counted after the ")" that ends the command name.
lt_cpu_ticks() {
    sed 's/.*) //' "/proc/$1/stat" | awk '{print $12 + $13 + $14 + $15}'
}

# The 1-minute load average.
lt_load1() {
    cut -d' ' -f1 /proc/loadavg
}
