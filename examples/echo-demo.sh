#!/usr/bin/env bash
# A complete dso session on loopback with nothing installed but Rust: two echo backends
# (served by `dso debug echo-server`), an agent in front of them (examples/echo.yaml), a
# client, a swap from blue to green with --wait, and a pause/resume. Everything it starts is
# stopped on exit. Run from the repository root:  bash examples/echo-demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --quiet -p dso-cli
DSO=target/debug/dso
export DSO_SOCKET=${DSO_SOCKET:-/tmp/dso-example.sock}
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

say() { printf '\n\033[1m$ %s\033[0m\n' "$*"; }
ask() {
  # Connects to the listener, sends one line, prints what comes back (greeting + echo).
  python3 - "$1" <<'PY'
import socket, sys
s = socket.create_connection(("127.0.0.1", 7000), timeout=5)
s.sendall(sys.argv[1].encode() + b"\n")
s.shutdown(socket.SHUT_WR)
print(s.makefile().read(), end="")
PY
}

$DSO debug echo-server 127.0.0.1:7001 --name blue & pids+=($!)
$DSO debug echo-server 127.0.0.1:7002 --name green & pids+=($!)
log=/tmp/dso-example-agent.log
$DSO agent --config examples/echo.yaml 2>"$log" & pids+=($!)
echo "agent log: $log"
for _ in $(seq 100); do $DSO proxy status >/dev/null 2>&1 && break; sleep 0.1; done

say "dso proxy status"; $DSO proxy status
say "client -> 127.0.0.1:7000"; ask "ping"
say "dso proxy swap echo 127.0.0.1:7002=green --wait"; $DSO proxy swap echo 127.0.0.1:7002=green --wait
say "client -> 127.0.0.1:7000"; ask "ping again"
say "dso proxy pause echo --max 10s"; $DSO proxy pause echo --max 10s
say "client connects during the pause (held), then: dso proxy resume echo"
ask "held" & client=$!
for _ in $(seq 100); do $DSO proxy status --json | grep -q '"held": 1' && break; sleep 0.05; done
$DSO proxy status
$DSO proxy resume echo
wait "$client"
say "dso proxy status"; $DSO proxy status
say "curl --unix-socket $DSO_SOCKET http://localhost/metrics (excerpt)"
python3 - "$DSO_SOCKET" <<'PY'
import socket, sys
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])
s.sendall(b"GET /metrics HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n")
body = b"".join(iter(lambda: s.recv(65536), b"")).decode().split("\r\n\r\n", 1)[1]
print("\n".join(l for l in body.splitlines() if l.startswith(("dso_proxy_connections_accepted", "dso_proxy_bytes", "dso_proxy_generation"))))
PY
