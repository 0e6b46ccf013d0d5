#!/usr/bin/env bash
# Load-test smoke run for CI (issue 3), at most about a minute and a half of load:
#   1. pgbench -C -S (a new connection per transaction, 8 clients) for 26 s through a dso
#      listener swapped between two PostgreSQL instances every 2 s (12 swaps, 5 s drain);
#   2. restart with hold: pause the listener, restart PostgreSQL (smart stop, start), resume,
#      under the same kind of load;
#   3. the CPU-per-round-trip scenario (issue 13) in short: one round of 1,600 pgbench -S
#      transactions, 3,200 echo round trips and 1 s of connect/echo/close through direct,
#      dso, HAProxy and socat (no strace).
# Exits non-zero on any failed transaction, aborted client, connection error or too few
# swaps; never on timing. Runs the real `dso agent` (debug build CI already made; DSO_BIN
# overrides) steered by `dso proxy swap/pause/resume`.
set -euo pipefail
# Debug builds (what CI has already built); set before lib.sh, whose defaults are release.
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
: "${DSO_LOAD:=$repo/target/debug/dso-load}"
: "${DSO_BIN:=$repo/target/debug/dso}"
export DSO_LOAD DSO_BIN
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
source "$LT_ROOT/scenarios.sh"

LT_OUT="$LT_SCRATCH/out"
mkdir -p "$LT_OUT/logs"
LT_CSV="$LT_OUT/results.csv"
echo "scenario,target,round,metric,value" >"$LT_CSV"
started=$SECONDS

lt_install
if [[ ! -x "$DSO_LOAD" || -z "${LT_NO_BUILD:-}" ]]; then
    (cd "$LT_REPO" && cargo build -q -p dso-loadtests -p dso-cli)
fi

fail=0
check() { # check SCENARIO METRIC OP VALUE
    local v
    v=$(awk -F, -v s="$1" -v m="$2" '$1 == s && $4 == m {print $5}' "$LT_CSV" | tail -1)
    if [[ -z "$v" ]] || ! python3 -c "import sys; sys.exit(0 if float('$v') $3 float('$4') else 1)"; then
        echo "smoke: FAIL $1 $2 = '${v}' (want $3 $4)" >&2
        fail=1
    else
        echo "smoke: ok   $1 $2 = $v" >&2
    fi
}

# checkt SCENARIO TARGET METRIC OP VALUE: as check, for one target's row.
checkt() {
    local v
    v=$(awk -F, -v s="$1" -v t="$2" -v m="$3" '$1 == s && $2 == t && $4 == m {print $5}' "$LT_CSV" | tail -1)
    if [[ -z "$v" ]] || ! python3 -c "import sys; sys.exit(0 if float('$v') $4 float('$5') else 1)"; then
        echo "smoke: FAIL $1 $2 $3 = '${v}' (want $4 $5)" >&2
        fail=1
    else
        echo "smoke: ok   $1 $2 $3 = $v" >&2
    fi
}

lt_setup_pg
p=$(lt_port)
lt_dso smoke "$p" "127.0.0.1:$PG_A" --drain-ms 5000
lt_log "smoke: pgbench -C -S 8 clients 26 s, swap every 2 s"
lt_swap_loop smoke "127.0.0.1:$PG_B" "127.0.0.1:$PG_A" 2 12 5000 &
loop=$!
rc=0
lt_pgbench_run smoke_C "$p" -C -S -c 8 -j 2 -T 26 -n || rc=$?
wait "$loop" || { echo "smoke: a swap command failed" >&2; fail=1; }
lt_row smoke_bluegreen dso 1 pgbench_exit "$rc"
lt_row smoke_bluegreen dso 1 swaps "$(grep -c ',swap,' "$LT_SCRATCH/events-smoke.csv" || true)"
lt_pgbench_rows smoke_bluegreen dso 1 smoke_C "$LT_SCRATCH/events-smoke.csv"
stats=$(lt_ctl smoke stats || true)
lt_row smoke_bluegreen dso 1 proxy_failed "$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["failed"])' "$stats" 2>/dev/null || echo NaN)"
lt_dso_stop smoke

sc_restart_hold 16

LT_ROUNDS=1 LT_CPU_TX=100 LT_CPU_RT=200 LT_CPU_CONN_SECS=1 LT_STRACE=0 sc_cpu_rt

check smoke_bluegreen pgbench_exit == 0
check smoke_bluegreen swaps '>=' 10
check smoke_bluegreen failed_tx == 0
check smoke_bluegreen aborted_clients == 0
check smoke_bluegreen tx_logged '>' 0
check smoke_bluegreen tx_logged_failed == 0
check smoke_bluegreen proxy_failed == 0
check restart_hold pgbench_exit == 0
check restart_hold failed_tx == 0
check restart_hold aborted_clients == 0
check restart_hold tx_logged '>' 0
check restart_hold tx_logged_failed == 0
for t in direct dso haproxy socat; do
    checkt cpu_rt_pgbench_S "$t" pgbench_exit == 0
    checkt cpu_rt_pgbench_S "$t" tx == 1600
    checkt cpu_rt_pingpong "$t" errors == 0
    checkt cpu_rt_pingpong "$t" round_trips == 3200
    checkt cpu_rt_connrate "$t" errors == 0
    checkt cpu_rt_connrate "$t" conns '>' 0
done

echo "smoke: figures (not judged): $(grep -E 'tps|p99|pause_to_resume|cpu_' "$LT_CSV" | tr '\n' ' ')" >&2
if ((fail)); then
    echo "smoke: pgbench output follows" >&2
    tail -n 30 "$LT_OUT"/logs/*.txt >&2 || true
    echo "smoke: FAILED after $((SECONDS - started)) s" >&2
    exit 1
fi
echo "smoke: passed in $((SECONDS - started)) s" >&2
