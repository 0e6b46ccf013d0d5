#!/usr/bin/env bash
# The dso load tests (issue 3). One command:
#
#   bash loadtests/run.sh [SCENARIO...]
#
# SCENARIO is any of: bluegreen_pg bluegreen_mariadb restart_hold throughput pgbench_s
# connrate memory cpu_rt (default: all, in that order). It installs what is missing (Debian
# packages), builds dso-load in release mode, starts private PostgreSQL/MariaDB/iperf3/
# HAProxy/socat instances on loopback ports in a scratch directory, runs the scenarios,
# stops everything it started and writes loadtests/runs/<date>-<host>/ (README.md with the
# commit, the machine and the command; results.csv; summary.md).
#
# Environment: LT_SECS (bulk runs, default 8), LT_BG_SECS (blue-green runs, default 60),
# LT_ROUNDS (side-by-side repeats, default 2), LT_IDLE (idle connections, default 9900),
# LT_OUT (result directory).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
source "$LT_ROOT/scenarios.sh"
source "$LT_ROOT/sockmap.sh"

all=(bluegreen_pg bluegreen_mariadb restart_hold throughput pgbench_s connrate memory cpu_rt)
scenarios=("$@")
((${#scenarios[@]})) || scenarios=("${all[@]}")

: "${LT_OUT:=$LT_ROOT/runs/$(date -u +%Y-%m-%d)-$(hostname -s)}"
mkdir -p "$LT_OUT/logs"
LT_CSV="$LT_OUT/results.csv"
[[ -f $LT_CSV ]] || echo "scenario,target,round,metric,value" >"$LT_CSV"

lt_install all
lt_build

{
    echo "# Load-test run $(basename "$LT_OUT")"
    echo
    echo "- commit: \`$(git -C "$LT_REPO" rev-parse --short HEAD)\`$(git -C "$LT_REPO" diff --quiet HEAD -- proxy loadtests || echo ' (with uncommitted changes in proxy/ or loadtests/)')"
    echo "- machine: $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)), $(free -g | awk '/Mem:/ {print $2}') GiB, kernel $(uname -r), $(. /etc/os-release && echo "$PRETTY_NAME")"
    echo "- load average at start: $(cut -d' ' -f1-3 /proc/loadavg) (other engineers' builds share the 2 cores)"
    echo "- versions: $(haproxy -v | head -1 | cut -d' ' -f1-3), $(iperf3 --version | head -1 | cut -d' ' -f1-2), $("$PG_BIN/postgres" --version), $(mariadbd --version | cut -d' ' -f2-4), $(sysbench --version)"
    echo "- command: \`LT_SECS=$LT_SECS LT_BG_SECS=$LT_BG_SECS LT_ROUNDS=$LT_ROUNDS LT_IDLE=$LT_IDLE LT_CPU_TX=$LT_CPU_TX LT_CPU_RT=$LT_CPU_RT LT_CPU_CONN_SECS=$LT_CPU_CONN_SECS bash loadtests/run.sh ${scenarios[*]}\`"
    [[ -n "${LT_DSO_B:-}" ]] && echo "- second dso build (target dso_b): \`LT_DSO_B=$LT_DSO_B\`"
    echo "- started: $(date -u +%FT%TZ)"
    echo
    echo "Raw figures: \`results.csv\`; tables: \`summary.md\`; tool outputs: \`logs/\`."
} >>"$LT_OUT/README.md"

for s in "${scenarios[@]}"; do
    lt_log "=== scenario $s"
    "sc_$s"
done
python3 "$LT_ROOT/summarize.py" "$LT_CSV" >"$LT_OUT/summary.md"
rm -rf "$LT_OUT/logs/pgbench"
echo "- finished: $(date -u +%FT%TZ)" >>"$LT_OUT/README.md"
cat "$LT_OUT/summary.md"
