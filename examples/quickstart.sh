#!/usr/bin/env bash
# The mission end to end on a fresh machine (Debian 12 with Rust, as root):
#   1. installs and starts what is missing (Docker engine, Compose v2 and v1),
#   2. builds dso, the launcher and the demo image (FROM scratch, nothing pulled),
#   3. `dso init` and `dso secret set` in a local vault of its own (a temp directory),
#   4. starts `dso agent` and runs `dso up -d` of examples/quickstart/compose.yaml: `web`
#      reads its key from a RAM-only file behind the dso-owned port 127.0.0.1:18080,
#      `worker` gets it as an env var (nothing in `docker inspect`) behind 127.0.0.1:18081,
#   5. changes the secret while a client keeps requesting `web`, and prints the requests
#      made, how many failed, the value served before and after, and how long it took.
# Everything it started is stopped and removed on exit (`dso down`, the agent, the vault).
#
#   bash examples/quickstart.sh
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD

step() { printf '\n\033[1m[%s] %s\033[0m\n' "$(date +%T)" "$*"; }
die() { printf 'quickstart: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root: it starts the Docker engine and mounts dso's tmpfs (sudo bash examples/quickstart.sh)"

step "1/8 services: the Docker engine and Compose (installed when missing)"
# shellcheck source=../.ci/services.sh
source "$repo/.ci/services.sh"
ensure_docker
ensure_compose

step "2/8 building dso (cargo build -p dso-cli; the first build takes a few minutes)"
cargo build -p dso-cli
DSO=$repo/target/debug/dso

step "3/8 building the launcher dso-init and the demo image (static binaries, FROM scratch)"
export DSO_TESTSRV_IMAGE=${DSO_TESTSRV_IMAGE:-dso-testsrv:test}
DSO_INIT_BIN=$(bash .ci/build-test-image.sh)
export DSO_INIT_BIN

DSO_QS_DIR=$(mktemp -d /tmp/dso-quickstart.XXXXXX)
export DSO_QS_DIR
export DSO_VAULT_FILE=$DSO_QS_DIR/vault.enc DSO_MASTER_KEY_FILE=$DSO_QS_DIR/master.key
export DSO_SOCKET=$DSO_QS_DIR/dso.sock
project=dso-quickstart
agent=
cleanup() {
    set +e
    if [ -S "$DSO_SOCKET" ]; then
        (cd "$repo/examples/quickstart" && "$DSO" down -p "$project" >/dev/null 2>&1)
    fi
    [ -n "$agent" ] && kill "$agent" 2>/dev/null && wait "$agent" 2>/dev/null
    cp "$DSO_QS_DIR/agent.log" /tmp/dso-quickstart-agent.log 2>/dev/null
    rm -rf "$DSO_QS_DIR"
}
trap cleanup EXIT

step "4/8 dso init (a vault of its own in $DSO_QS_DIR)"
"$DSO" init

step "5/8 dso secret set demo/api_key (the value comes from stdin, never from argv)"
old=key-$(head -c 6 /dev/urandom | od -An -tx1 | tr -d ' \n')
new=key-$(head -c 6 /dev/urandom | od -An -tx1 | tr -d ' \n')
printf %s "$old" | "$DSO" secret set demo/api_key

step "6/8 dso agent (its log is kept as /tmp/dso-quickstart-agent.log)"
"$DSO" agent --config examples/quickstart/dso.yaml --state-dir "$DSO_QS_DIR/state" --docker \
    2>"$DSO_QS_DIR/agent.log" &
agent=$!
for _ in $(seq 100); do "$DSO" status >/dev/null 2>&1 && break; sleep 0.1; done
"$DSO" status >/dev/null || die "the agent did not start; see /tmp/dso-quickstart-agent.log"

step "7/8 dso up -d (examples/quickstart/compose.yaml)"
(cd examples/quickstart && "$DSO" up -p "$project" -d)
printf 'waiting for web on 127.0.0.1:18080 '
for _ in $(seq 300); do
    curl -sf "http://127.0.0.1:18080/file?path=/run/secrets/API_KEY_FILE" >/dev/null && break
    printf .; sleep 0.2
done
echo
"$DSO" status

step "8/8 changing the secret while a client keeps requesting web"
# The client: one request at a time on a new connection each, for at most 90 s; it stops
# 2 s after it first sees the new value. Prints a JSON summary on its last line.
# The values reach the helpers through their environment (readable by root and this user
# only), never through argv, which every user of the host sees in `ps`.
QS_OLD=$old QS_NEW=$new python3 - >"$DSO_QS_DIR/client.out" <<'PY' &
import json, os, time, urllib.request
old, new = os.environ["QS_OLD"], os.environ["QS_NEW"]
url = "http://127.0.0.1:18080/file?path=/run/secrets/API_KEY_FILE"
made = failed = 0
first_new = None
errors = []
start = time.monotonic()
while time.monotonic() - start < 90:
    made += 1
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            body = r.read().decode()
        if body == new and first_new is None:
            first_new = time.time()
        elif body not in (old, new):
            failed += 1
            errors.append("unexpected body")
    except Exception as e:  # refused, reset, timeout, HTTP error: a failed request
        failed += 1
        errors.append(str(e)[:120])
    if first_new is not None and time.time() - first_new > 2:
        break
print(json.dumps({"made": made, "failed": failed, "first_new": first_new, "errors": errors[:5]}))
PY
client=$!
sleep 2
before=$(curl -sf "http://127.0.0.1:18080/file?path=/run/secrets/API_KEY_FILE")
worker_before=$(curl -sf "http://127.0.0.1:18081/env/API_KEY")
set_at=$(python3 -c 'import time; print(time.time())')
printf %s "$new" | "$DSO" secret set demo/api_key
wait "$client"
summary=$(tail -n 1 "$DSO_QS_DIR/client.out")
after=$(curl -sf "http://127.0.0.1:18080/file?path=/run/secrets/API_KEY_FILE")
for _ in $(seq 300); do
    worker_after=$(curl -sf "http://127.0.0.1:18081/env/API_KEY" || true)
    [ "$worker_after" = "$new" ] && break
    sleep 0.2
done

QS_SUMMARY=$summary QS_SET_AT=$set_at QS_BEFORE=$before QS_AFTER=$after \
QS_WORKER_BEFORE=$worker_before QS_WORKER_AFTER=$worker_after python3 - <<'PY'
import json, os
e = os.environ
s = json.loads(e["QS_SUMMARY"]); set_at = float(e["QS_SET_AT"])
took = (s["first_new"] - set_at) if s["first_new"] else None
print(f"requests made:      {s['made']}")
print(f"requests failed:    {s['failed']}" + (f"  {s['errors']}" if s["errors"] else ""))
print(f"web served before:  {e['QS_BEFORE']}")
print(f"web serves after:   {e['QS_AFTER']}")
print(f"worker env before:  {e['QS_WORKER_BEFORE']}")
print(f"worker env after:   {e['QS_WORKER_AFTER']}")
print("rotation took:      " + (f"{took:.2f} s from `dso secret set` to the first request answered with the new value" if took is not None else "the new value was not served within 90 s"))
PY
"$DSO" status
[ "$after" = "$new" ] || die "web does not serve the new value; see /tmp/dso-quickstart-agent.log"
