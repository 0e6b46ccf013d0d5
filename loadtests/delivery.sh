#!/usr/bin/env bash
# Secret delivery timings (issue 10, "Numbers"), against the real Docker engine:
#   1. set → serving: a local vault, the release `dso agent --docker`, one `dso-testsrv:test`
#      container consuming one secret by file injection (rolling, TCP health check). N times:
#      `dso secret set` (the CLI notifies the agent), then the proxy port is polled every
#      ~10 ms with short connections reading the greeting `dso-testsrv <INSTANCE_ID>` until
#      the instance changes. The agent's rotation report (GET /v1/rotations) and its history
#      file split the time into notify → rotation start, green created, started, healthy
#      (the container's own start), swapped.
#   2. launcher overhead: the same image started N times directly and N times through the
#      static dso-init (bind-mounted, one env file in a tmpfs directory), each timed from
#      `docker start` returning to the first greeting on the container's IP.
# Waits (bounded) for a quiet machine first and records the load average at start and end.
# Writes loadtests/runs/delivery-<UTC date and time>.{csv,md}. Every loop is bounded; the
# EXIT trap stops the agent, removes the run's containers and network, unmounts the tmpfs
# mounts and the scratch directory.
#
#   bash loadtests/delivery.sh                 # N=10, wait up to 20 min for load < 2.5
#   DL_N=3 DL_QUIET_WAIT=0 bash loadtests/delivery.sh   # a quick try
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

: "${DL_N:=10}"                 # iterations of each measurement
: "${DL_MAX_LOAD:=2.5}"         # wait until the 1-minute load average is below this
: "${DL_QUIET_WAIT:=1200}"      # ... for at most this many seconds
: "${DSO_TESTSRV_IMAGE:=dso-testsrv:test}"
DL_RUN="dsodl$$x$(date +%s)"
DL_NET="${DL_RUN}_default"
DL_STAMP=$(date -u +%Y-%m-%dT%H%M%S)
DL_CSV="$LT_ROOT/runs/delivery-$DL_STAMP.csv"
DL_MD="$LT_ROOT/runs/delivery-$DL_STAMP.md"
DL_AGENT_PID=
DL_MOUNTS=()

dl_cleanup() {
    if [[ -n "$DL_AGENT_PID" ]]; then
        # The agent first, so it does not react to the removals.
        kill -TERM "$DL_AGENT_PID" 2>/dev/null || true
        wait "$DL_AGENT_PID" 2>/dev/null || true
    fi
    local ids
    ids=$(docker ps -aq --filter "label=dso.test.run=$DL_RUN" 2>/dev/null || true)
    [[ -z "$ids" ]] || docker rm -f $ids >/dev/null 2>&1 || true
    docker network rm "$DL_NET" >/dev/null 2>&1 || true
    local m
    for m in "${DL_MOUNTS[@]}"; do
        mountpoint -q "$m" && umount "$m" 2>/dev/null || true
    done
    lt_cleanup
}
trap dl_cleanup EXIT

loadavg() { cut -d' ' -f1 /proc/loadavg; }

# Waits until the 1-minute load average is below DL_MAX_LOAD, at most DL_QUIET_WAIT seconds.
# Sets DL_QUIET to yes or no (the run goes on either way; the notes say which).
dl_wait_quiet() {
    local end=$((SECONDS + DL_QUIET_WAIT)) l
    DL_QUIET=no
    while :; do
        l=$(loadavg)
        if python3 -c "import sys; sys.exit(0 if $l < $DL_MAX_LOAD else 1)"; then
            DL_QUIET=yes
            return 0
        fi
        ((SECONDS < end)) || break
        lt_log "load average $l >= $DL_MAX_LOAD; waiting ($((end - SECONDS)) s left)"
        sleep 15
    done
    lt_log "load average still $(loadavg) after ${DL_QUIET_WAIT} s; measuring anyway (recorded)"
}

dso() { "$DSO_BIN" --socket "$DL_SOCK" "$@"; }
vault_env() { DSO_VAULT_FILE="$DL_VAULT/vault.enc" DSO_MASTER_KEY_FILE="$DL_VAULT/master.key" "$@"; }
api_get() { curl -sf --unix-socket "$DL_SOCK" "http://localhost$1"; }
running() { [[ $(docker inspect -f '{{.State.Running}}' "$1" 2>/dev/null) == true ]]; }

# The one running container of the run that carries dso.delivery.instance and is not $1;
# waits at most 60 s.
dl_delivered() {
    local not=${1:-} i ids id
    for ((i = 0; i < 600; i++)); do
        ids=$(docker ps -q --filter "label=dso.test.run=$DL_RUN" --filter "label=dso.delivery.instance")
        if [[ $(wc -w <<<"$ids") == 1 && "$ids" != "$not" ]] && [[ $(docker ps -q --filter "label=dso.test.run=$DL_RUN" | wc -l) == 1 ]]; then
            echo "$ids"
            return 0
        fi
        sleep 0.1
    done
    lt_log "no delivered container after 60 s; agent log:"
    tail -n 40 "$LT_SCRATCH/agent.log" >&2
    return 1
}

# The greeting's instance id on 127.0.0.1:$1 (one short connection).
greeting() {
    python3 - "$1" <<'PY'
import socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=2)
s.settimeout(2)
print(s.makefile().readline().split()[1])
PY
}

# One set → serving measurement: dl_set_and_wait PORT OLD_ID.
# t0 just before `dso secret set` is spawned; polls the proxy port every ~10 ms (bounded:
# 60 s) until the greeting names another instance. Prints "t0_ns t1_ns new_id set_ms".
dl_set_and_wait() {
    vault_env python3 - "$1" "$2" "$DSO_BIN" "$DL_SOCK" "$DL_SECRET" <<'PY'
import base64, os, socket, subprocess, sys, time
port, old, dso, sock, name = sys.argv[1:]
value = base64.b64encode(os.urandom(24))  # a fresh random value, only in memory and the pipe
t0 = time.time_ns()
p = subprocess.Popen([dso, "--socket", sock, "secret", "set", name], stdin=subprocess.PIPE,
                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
p.stdin.write(value)
p.stdin.close()
set_ns = None
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    if set_ns is None and p.poll() is not None:
        set_ns = time.time_ns()
        if p.returncode != 0:
            sys.exit("dso secret set failed: " + p.stderr.read().decode(errors="replace"))
    try:
        with socket.create_connection(("127.0.0.1", int(port)), timeout=1) as s:
            s.settimeout(1)
            line = s.makefile().readline().split()
        if len(line) == 2 and line[1] != old:
            t1 = time.time_ns()
            p.wait(10)
            if set_ns is None:
                set_ns = time.time_ns()
            print(t0, t1, line[1], round((set_ns - t0) / 1e6, 1))
            sys.exit(0)
    except OSError:
        pass
    time.sleep(0.01)
sys.exit("the proxy never served another instance within 60 s")
PY
}

# After an iteration: waits for the newest rotation request (id > $1) to finish, then prints
# "id created started healthy swapped took queue_ms begin_ms" (ms since the rotation's start;
# begin_ms: wall-clock start from the agent's history file).
dl_report() {
    local after=$1 i out
    for ((i = 0; i < 600; i++)); do
        out=$(api_get /v1/rotations | python3 -c '
import json, sys, glob
after = int(sys.argv[1]); state = sys.argv[2]
ts = [t for t in json.load(sys.stdin) if int(t["id"]) > after]
if not ts: sys.exit(1)
t = max(ts, key=lambda t: int(t["id"]))
if t["state"] == "running": sys.exit(1)
if t["state"] != "done":
    print("FAILED", t.get("error")); sys.exit(0)
c = t["report"]["containers"][0]
steps = {s["step"]: s["elapsed_ms"] for s in c["steps"]}
hist = [json.load(open(f)) for f in glob.glob(state + "/history/*.json")]
hist = [h for h in hist if h["rotation"] == c["rotation"]]
begin = hist[0]["started_at_ms"] if hist else "NaN"
print(t["id"], steps["green_created"], steps["green_started"], steps["green_healthy"],
      steps["swapped"], c["took_ms"], t["report"]["took_ms"] - c["took_ms"], begin)
' "$after" "$DL_STATE") && { echo "$out"; return 0; }
        sleep 0.1
    done
    lt_log "rotation after request $after did not finish in 60 s"
    return 1
}

row() { printf '%s,%s,%s,%s,%s\n' "$1" "$2" "$3" "$4" "$5" >>"$DL_CSV"; }

# ---------------------------------------------------------------------------------------
mkdir -p "$LT_ROOT/runs"
command -v curl >/dev/null || { lt_log "curl is needed (apt-get install curl)"; exit 1; }
lt_log "cargo build --release -p dso-cli"
[[ -n "${LT_NO_BUILD:-}" ]] || (cd "$LT_REPO" && cargo build --release -q -p dso-cli)
DL_INIT=$(bash "$LT_REPO/.ci/build-test-image.sh" --init-path)
if [[ ! -x "$DL_INIT" ]] || ! docker image inspect "$DSO_TESTSRV_IMAGE" >/dev/null 2>&1; then
    bash "$LT_REPO/.ci/build-test-image.sh" >/dev/null
fi

dl_wait_quiet
DL_LOAD_START=$(cat /proc/loadavg)
echo "scenario,target,round,metric,value" >"$DL_CSV"
row meta all 0 loadavg_start "$(loadavg)"
row meta all 0 quiet_reached "$DL_QUIET"
lt_log "load average at start: $DL_LOAD_START"

DL_VAULT="$LT_SCRATCH/vault"
DL_STATE="$LT_SCRATCH/state"
DL_SOCK="$LT_SCRATCH/dso.sock"
DL_ROOT="$LT_SCRATCH/secrets"
DL_SECRET=app/db_password
mkdir -p "$DL_VAULT" "$DL_STATE"
chmod 700 "$DL_VAULT" "$DL_STATE"
DL_MOUNTS+=("$DL_ROOT")
vault_env "$DSO_BIN" --socket "$DL_SOCK" init >/dev/null
# Random values, piped: never in argv, never in a file.
head -c 24 /dev/urandom | base64 | tr -d "\n" | vault_env "$DSO_BIN" --socket "$DL_SOCK" secret set "$DL_SECRET" >/dev/null

cat >"$LT_SCRATCH/dso.yaml" <<YAML
version: v1.0.0
providers:
  local:
    type: local
    vault_file: $DL_VAULT/vault.enc
    master_key_file: $DL_VAULT/master.key
agent:
  watch:
    polling_interval: 30s
    debounce: 0s
  delivery:
    root: $DL_ROOT
    launcher: $DL_INIT
proxy:
  listeners: []
secrets:
  - name: db
    provider: local
    mappings:
      db_password: $DL_SECRET
    inject:
      type: file
    rotation:
      strategy: rolling
YAML

docker network create --label "dso.test.run=$DL_RUN" "$DL_NET" >/dev/null
docker run -d --name "$DL_RUN-web-1" --network "$DL_NET" --no-healthcheck \
    --label "dso.test.run=$DL_RUN" --label dso.reloader=true \
    --label dso.host_ports=127.0.0.1:0:8080 --label dso.update.strategy=rolling \
    --label dso.drain.timeout=2s --label dso.secrets=db \
    --label "com.docker.compose.project=$DL_RUN" --label com.docker.compose.service=web \
    "$DSO_TESTSRV_IMAGE" >/dev/null

RUST_LOG=info "$DSO_BIN" agent --config "$LT_SCRATCH/dso.yaml" --socket "$DL_SOCK" --docker \
    --docker-scope "dso.test.run=$DL_RUN" --state-dir "$DL_STATE" >"$LT_SCRATCH/agent.log" 2>&1 &
DL_AGENT_PID=$!
for ((i = 0; i < 200; i++)); do
    api_get /v1/health >/dev/null 2>&1 && break
    kill -0 "$DL_AGENT_PID" 2>/dev/null || { tail -n 40 "$LT_SCRATCH/agent.log" >&2; exit 1; }
    sleep 0.1
done
lt_log "agent up; waiting for the first delivery"
cur=$(dl_delivered "")
port=$(dso proxy status --json | python3 -c '
import json, sys
v = json.load(sys.stdin)
ls = v["listeners"] if isinstance(v, dict) else v
for l in ls:
    addr = l.get("bind")
    if addr: print(addr.rsplit(":", 1)[1]); break
')
lt_log "proxy port $port serves $(greeting "$port"); container $cur"
[[ $(greeting "$port") == "$cur" ]] || { lt_log "greeting is not the container's short id"; exit 1; }
# The first delivery's rotation finishes (rename included) before the first change.
for ((i = 0; i < 600; i++)); do
    last=$(api_get /v1/rotations | python3 -c '
import json, sys
ts = json.load(sys.stdin)
print(-1 if any(t["state"] == "running" for t in ts) else max([int(t["id"]) for t in ts] or [0]))')
    ((last >= 0)) && break
    sleep 0.1
done
((last >= 0)) || { lt_log "the first delivery's rotation did not finish in 60 s"; exit 1; }

dl_fmt='%-4s %10s %8s %9s %7s %10s %13s %6s %9s %12s\n'
# shellcheck disable=SC2059
printf "$dl_fmt" iter set→serving cli_set →begin create start_call start→healthy swap seen_lag minus_start >&2
for ((n = 1; n <= DL_N; n++)); do
    out=$(dl_set_and_wait "$port" "$cur")
    read -r t0 t1 new set_ms <<<"$out"
    out=$(dl_report "$last")
    read -r id created started healthy swapped took queue begin <<<"$out"
    [[ "$id" != FAILED ]] || { lt_log "rotation failed: $created $started"; tail -n 40 "$LT_SCRATCH/agent.log" >&2; exit 1; }
    last=$id
    # wall clock: t0 → rotation begin (the agent's history, ms) → swap (+ report's ms) → seen
    python3 - "$n" "$t0" "$t1" "$set_ms" "$created" "$started" "$healthy" "$swapped" "$took" "$queue" "$begin" >>"$LT_SCRATCH/rows" <<'PY'
import sys
n, t0, t1 = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
set_ms = float(sys.argv[4])
created, started, healthy, swapped, took, queue = map(int, sys.argv[5:11])
begin = float(sys.argv[11])
total = (t1 - t0) / 1e6
to_begin = begin - t0 / 1e6
seen_lag = total - to_begin - swapped
print(n, round(total, 1), set_ms, round(to_begin, 1), created, started - created, healthy - started,
      swapped - healthy, round(seen_lag, 1), round(total - (healthy - started), 1), queue, took,
      round(total - (healthy - created), 1))
PY
    read -r _ total set_ms to_begin create start_call start_healthy swap seen_lag minus queue took dso_part <<<"$(tail -1 "$LT_SCRATCH/rows")"
    # shellcheck disable=SC2059
    printf "$dl_fmt" "$n" "$total" "$set_ms" "$to_begin" "$create" "$start_call" "$start_healthy" "$swap" "$seen_lag" "$minus" >&2
    for m in total set_ms to_begin create start_call start_healthy swap seen_lag minus queue took dso_part; do
        row set_to_serving rolling "$n" "$m" "${!m}"
    done
    row set_to_serving rolling "$n" green_id "$new"
    # The next change only once blue is gone and green carries the name (a rotation in
    # progress would merge or queue the next one).
    cur=$(dl_delivered "$cur")
    [[ "$cur" == "$new" ]] || { lt_log "serving $new but the remaining container is $cur"; exit 1; }
done

# --- launcher overhead ------------------------------------------------------------------
# Nothing else of the run goes on meanwhile: the agent stops, its container is removed.
kill -TERM "$DL_AGENT_PID"
wait "$DL_AGENT_PID" || true
DL_AGENT_PID=
docker rm -f "$cur" >/dev/null
envdir="$LT_SCRATCH/envdir"
mkdir -p "$envdir"
mount -t tmpfs -o size=1m,mode=0755 dso-delivery-bench "$envdir"
DL_MOUNTS+=("$envdir")
printf 'not-a-secret' >"$envdir/BENCH_VAR"
chmod 0444 "$envdir/BENCH_VAR"

# One start: dl_start MODE ROUND. Times `docker start` (the call) and from its return to the
# first greeting on the container's IP:8080 (polled every ~5 ms, at most 20 s, checking
# every 20 attempts that the container still runs).
dl_start() {
    local mode=$1 n=$2 name="$DL_RUN-bench-$1-$2" args
    if [[ $mode == direct ]]; then
        args=(--entrypoint /dso-testsrv "$DSO_TESTSRV_IMAGE" --listen 0.0.0.0:8080 --http 0.0.0.0:8081)
    else
        args=(-v "$DL_INIT:/run/dso/init:ro" -v "$envdir:/run/dso/env:ro" --entrypoint /run/dso/init
            "$DSO_TESTSRV_IMAGE" --env-dir /run/dso/env -- /dso-testsrv --listen 0.0.0.0:8080 --http 0.0.0.0:8081)
    fi
    docker create --name "$name" --network "$DL_NET" --no-healthcheck --label "dso.test.run=$DL_RUN" "${args[@]}" >/dev/null
    python3 - "$name" <<'PY'
import socket, subprocess, sys, time
name = sys.argv[1]
a = time.monotonic_ns()
subprocess.run(["docker", "start", name], check=True, stdout=subprocess.DEVNULL)
b = time.monotonic_ns()
def inspect():
    out = subprocess.run(["docker", "inspect", "-f",
        "{{.State.Running}} {{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}", name],
        check=True, capture_output=True, text=True).stdout.split()
    return out[0] == "true", (out[1] if len(out) > 1 else "")
c = time.monotonic_ns()
up, ip = inspect()
inspect_ns = time.monotonic_ns() - c
deadline = time.monotonic() + 20
tries = 0
while up and ip and time.monotonic() < deadline:
    try:
        with socket.create_connection((ip, 8080), timeout=0.5) as s:
            s.settimeout(1)
            if s.makefile().readline().startswith("dso-testsrv "):
                t = time.monotonic_ns()
                # the inspect call is not the container's doing: left out of start→greeting
                print(round((b - a) / 1e6, 1), round((t - b - inspect_ns) / 1e6, 1))
                sys.exit(0)
    except OSError:
        pass
    tries += 1
    if tries % 20 == 0:
        up, ip = inspect()
    time.sleep(0.005)
sys.exit(f"{name}: no greeting (running={up}, ip={ip!r})")
PY
    docker rm -f "$name" >/dev/null
}

lt_log "launcher overhead: $DL_N starts each, direct and through dso-init, interleaved"
for ((n = 1; n <= DL_N; n++)); do
    for mode in direct launcher; do
        out=$(dl_start "$mode" "$n")
        read -r call ready <<<"$out"
        printf '%-9s %2s docker start %7s ms, start returned → greeting %7s ms\n' "$mode" "$n" "$call" "$ready" >&2
        row container_start "$mode" "$n" start_call_ms "$call"
        row container_start "$mode" "$n" start_to_greeting_ms "$ready"
    done
done

row meta all 0 loadavg_end "$(loadavg)"
DL_LOAD_END=$(cat /proc/loadavg)
lt_log "load average at end: $DL_LOAD_END"

# --- summary ----------------------------------------------------------------------------
summary=$(python3 - "$DL_CSV" <<'PY'
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1])))
def vals(s, t, m):
    return [float(r["value"]) for r in rows if r["scenario"] == s and r["target"] == t and r["metric"] == m]
def line(label, v):
    return f"| {label} | {statistics.median(v):.1f} | {min(v):.1f} | {max(v):.1f} |"
out = ["| figure (ms) | median | min | max |", "|---|---|---|---|"]
labels = [
    ("total", "`dso secret set` spawned → proxy serves green (set → serving)"),
    ("set_ms", "`dso secret set` process (write vault, notify agent), spawn → exit"),
    ("to_begin", "spawn → rotation begins (agent's history, ms clock)"),
    ("create", "begin → green created (incl. delivery files written)"),
    ("start_call", "green created → started (Docker start call)"),
    ("start_healthy", "green started → healthy (the container's own start + TCP check)"),
    ("swap", "healthy → swapped"),
    ("seen_lag", "swapped → first greeting from green seen (poll granularity)"),
    ("minus", "set → serving minus (started → healthy)"),
    ("dso_part", "set → serving minus (created → healthy: Docker's start call and the container's start)"),
    ("queue", "rotation request queued (report took_ms − container took_ms)"),
]
for m, label in labels:
    out.append(line(label, vals("set_to_serving", "rolling", m)))
minus = statistics.median(vals("set_to_serving", "rolling", "minus"))
worst = max(vals("set_to_serving", "rolling", "minus"))
out.append("")
out.append(f"Target (set → serving) − (green start → healthy) < 1000 ms: median {minus:.1f} ms, "
           f"max {worst:.1f} ms: {'met' if worst < 1000 else ('met by the median, not every time' if minus < 1000 else 'NOT met')}.")
out.append("")
out.append("| container start (ms) | median | min | max |")
out.append("|---|---|---|---|")
for t in ("direct", "launcher"):
    out.append(line(f"{t}: `docker start` call", vals("container_start", t, "start_call_ms")))
    out.append(line(f"{t}: start returned → first greeting", vals("container_start", t, "start_to_greeting_ms")))
d = [statistics.median(vals("container_start", "launcher", m)) - statistics.median(vals("container_start", "direct", m))
     for m in ("start_call_ms", "start_to_greeting_ms")]
out.append("")
out.append(f"Launcher overhead (median launcher − median direct): `docker start` call {d[0]:+.1f} ms, "
           f"start returned → greeting {d[1]:+.1f} ms, sum {d[0] + d[1]:+.1f} ms.")
print("\n".join(out))
PY
)
echo "$summary" >&2
cat >"$DL_MD" <<MD
# Secret delivery run $DL_STAMP

- command: \`bash loadtests/delivery.sh\` (DL_N=$DL_N, DL_MAX_LOAD=$DL_MAX_LOAD, DL_QUIET_WAIT=$DL_QUIET_WAIT)
- commit: $(cd "$LT_REPO" && git rev-parse --short HEAD)$(cd "$LT_REPO" && git diff --quiet HEAD -- . ':!loadtests/runs' || echo ' (with uncommitted changes)')
- machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(uname -r), Docker $(docker version -f '{{.Server.Version}}') (API $(docker version -f '{{.Server.APIVersion}}'))
- load average at start: $DL_LOAD_START (quiet, below $DL_MAX_LOAD: $DL_QUIET); at end: $DL_LOAD_END
- dso: release build; launcher: $DL_INIT; image: $DSO_TESTSRV_IMAGE
- raw figures: \`$(basename "$DL_CSV")\`

$summary
MD
lt_log "wrote $DL_CSV and $DL_MD"
