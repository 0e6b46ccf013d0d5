# The load-test scenarios of issue 3, as functions. Sourced by run.sh and smoke.sh after
# lib.sh. Each writes raw figures with lt_row and keeps its logs under $LT_OUT/logs.
# Durations come from the environment so the smoke run can shorten them:
#   LT_SECS (bulk runs), LT_BG_SECS (blue-green runs), LT_ROUNDS (repeats side by side).

: "${LT_SECS:=8}"
: "${LT_BG_SECS:=60}"
: "${LT_ROUNDS:=2}"
: "${LT_IDLE:=9900}"

# Ports and processes shared by the scenarios of one run.
lt_setup_pg() {
    [[ -n "${PG_A:-}" ]] && return 0
    PG_A=$(lt_port)
    PG_B=$(lt_port)
    lt_log "postgres: initialising two instances ($PG_A, $PG_B)"
    lt_pg_init "$LT_SCRATCH/pga" "$PG_A" 1
    lt_pg_stop "$LT_SCRATCH/pga"
    lt_pg_clone "$LT_SCRATCH/pga" "$LT_SCRATCH/pgb"
    lt_pg_start "$LT_SCRATCH/pga" "$PG_A"
    lt_pg_start "$LT_SCRATCH/pgb" "$PG_B"
    mkdir -p "$LT_OUT/logs/pgbench" && chmod 777 "$LT_OUT/logs/pgbench"
}

# Runs pgbench (as postgres) with per-transaction logs; writes its output to
# $LT_OUT/logs/NAME.txt and returns pgbench's exit code.
lt_pgbench_run() {
    local name=$1 port=$2
    shift 2
    local rc=0
    lt_pgbench "$port" "$@" -l --log-prefix="$LT_OUT/logs/pgbench/$name" >"$LT_OUT/logs/$name.txt" 2>&1 || rc=$?
    return $rc
}

# Records pgbench's figures for one run and the latency split around swap/pause events.
lt_pgbench_rows() {
    local scenario=$1 target=$2 round=$3 name=$4 events=${5:-}
    local tps failed aborted lat
    read -r tps failed aborted lat < <(lt_pgbench_figures "$LT_OUT/logs/$name.txt")
    lt_row "$scenario" "$target" "$round" tps "$tps"
    lt_row "$scenario" "$target" "$round" failed_tx "$failed"
    lt_row "$scenario" "$target" "$round" aborted_clients "$aborted"
    lt_row "$scenario" "$target" "$round" lat_avg_ms "$lat"
    python3 "$LT_ROOT/latency.py" "$LT_OUT/logs/pgbench" "$name" "$events" |
        while read -r metric value; do lt_row "$scenario" "$target" "$round" "$metric" "$value"; done
}

# 1. Blue-green under PostgreSQL load.
sc_bluegreen_pg() {
    lt_setup_pg
    local secs=$LT_BG_SECS swaps=$((LT_BG_SECS / 2)) p rc
    local a="127.0.0.1:$PG_A" b="127.0.0.1:$PG_B"

    # Direct baselines of the connection-per-transaction runs (a third of the run time).
    for script in select tpcb; do
        local args=(-C -c 16 -j 2 -T "$((secs / 3))" -n)
        [[ $script == select ]] && args+=(-S)
        lt_log "blue-green pg: pgbench -C $script direct baseline"
        rc=0
        lt_pgbench_run "bg_C_${script}_direct" "$PG_A" "${args[@]}" || rc=$?
        lt_row bluegreen_pg_C_$script direct 1 pgbench_exit "$rc"
        lt_pgbench_rows bluegreen_pg_C_$script direct 1 "bg_C_${script}_direct"
    done
    p=$(lt_port)
    lt_dso bg "$p" "$a" --drain-ms 5000
    for script in select tpcb; do
        local args=(-C -c 16 -j 2 -T "$secs" -n)
        [[ $script == select ]] && args+=(-S)
        lt_log "blue-green pg: pgbench -C $script, ${secs}s, swap every 2s, 5s drain"
        : >"$LT_SCRATCH/events-bg.mark"
        local from_line
        from_line=$(wc -l <"$LT_SCRATCH/events-bg.csv")
        lt_swap_loop bg "$b" "$a" 2 "$swaps" 5000 &
        local loop=$!
        rc=0
        lt_pgbench_run "bg_C_$script" "$p" "${args[@]}" || rc=$?
        wait "$loop" || true
        tail -n +"$((from_line + 1))" "$LT_SCRATCH/events-bg.csv" >"$LT_OUT/logs/events-bg_C_$script.csv"
        lt_row bluegreen_pg_C_$script dso 1 pgbench_exit "$rc"
        lt_row bluegreen_pg_C_$script dso 1 swaps "$(grep -c ',swap,' "$LT_OUT/logs/events-bg_C_$script.csv" || true)"
        lt_pgbench_rows bluegreen_pg_C_$script dso 1 "bg_C_$script" "$LT_OUT/logs/events-bg_C_$script.csv"
    done
    lt_dso_stop bg

    # Persistent connections: direct baseline, then through dso with a drain longer than
    # the run (nothing is forced), then with a 1 s drain (forced closes).
    lt_log "blue-green pg: persistent pgbench -S direct baseline"
    rc=0
    lt_pgbench_run bg_persist_direct "$PG_A" -S -c 16 -j 2 -T "$secs" -n || rc=$?
    lt_row bluegreen_pg_persistent direct 1 pgbench_exit "$rc"
    lt_pgbench_rows bluegreen_pg_persistent direct 1 bg_persist_direct
    local drain
    for drain in long short; do
        local ms=$(((secs + 60) * 1000))
        [[ $drain == short ]] && ms=1000
        p=$(lt_port)
        lt_dso "bg$drain" "$p" "$a" --drain-ms "$ms"
        lt_log "blue-green pg: persistent pgbench -S through dso, swap every 2s, drain ${ms}ms"
        lt_swap_loop "bg$drain" "$b" "$a" 2 "$swaps" "$ms" &
        local loop=$!
        rc=0
        lt_pgbench_run "bg_persist_$drain" "$p" -S -c 16 -j 2 -T "$secs" -n || rc=$?
        wait "$loop" || true
        cp "$LT_SCRATCH/events-bg$drain.csv" "$LT_OUT/logs/events-bg_persist_$drain.csv"
        lt_row "bluegreen_pg_persistent_${drain}_drain" dso 1 pgbench_exit "$rc"
        lt_pgbench_rows "bluegreen_pg_persistent_${drain}_drain" dso 1 "bg_persist_$drain" "$LT_OUT/logs/events-bg_persist_$drain.csv"
        lt_ctl "bg$drain" stats >"$LT_OUT/logs/stats-bg_persist_$drain.json" || true
        lt_dso_stop "bg$drain"
    done
}

# 1b. Blue-green under MariaDB load: connection per query (mysqlslap --detach=1) and
# sysbench oltp_read_only with persistent connections.
sc_bluegreen_mariadb() {
    local ma mb p rc
    ma=$(lt_port)
    mb=$(lt_port)
    lt_log "mariadb: initialising two instances ($ma, $mb)"
    lt_my_init "$LT_SCRATCH/mya" "$ma"
    lt_my_init "$LT_SCRATCH/myb" "$mb"
    local port sb=(--db-driver=mysql --mysql-host=127.0.0.1 --mysql-user=root --tables=2 --table-size=10000)
    for port in "$ma" "$mb"; do
        mariadb -h 127.0.0.1 -P "$port" -uroot -e 'CREATE DATABASE IF NOT EXISTS sbtest'
        sysbench oltp_read_only "${sb[@]}" --mysql-port="$port" prepare >/dev/null
    done
    local secs=$LT_BG_SECS swaps=$((LT_BG_SECS / 2))
    p=$(lt_port)
    lt_dso my "$p" "127.0.0.1:$ma" --drain-ms 5000
    lt_log "blue-green mariadb: mysqlslap connection per query, ${secs}s, swap every 2s"
    lt_swap_loop my "127.0.0.1:$mb" "127.0.0.1:$ma" 2 "$swaps" 5000 &
    local loop=$! end=$((SECONDS + secs)) runs=0 failed_runs=0 queries=0 started=$SECONDS
    while ((SECONDS < end)); do
        if mysqlslap -h 127.0.0.1 -P "$p" -uroot --create-schema=sbtest --concurrency=16 \
            --number-of-queries=1600 --detach=1 --query='SELECT 1' >>"$LT_OUT/logs/mysqlslap.txt" 2>&1; then
            queries=$((queries + 1600))
        else
            failed_runs=$((failed_runs + 1))
        fi
        runs=$((runs + 1))
    done
    local took=$((SECONDS - started))
    wait "$loop" || true
    lt_row bluegreen_mariadb_connect_per_query dso 1 mysqlslap_runs "$runs"
    lt_row bluegreen_mariadb_connect_per_query dso 1 failed_runs "$failed_runs"
    lt_row bluegreen_mariadb_connect_per_query dso 1 queries "$queries"
    lt_row bluegreen_mariadb_connect_per_query dso 1 queries_per_s "$((queries / (took > 0 ? took : 1)))"
    lt_row bluegreen_mariadb_connect_per_query dso 1 swaps "$(grep -c ',swap,' "$LT_SCRATCH/events-my.csv" || true)"
    lt_dso_stop my

    local target
    for target in direct dso; do
        local port=$ma
        if [[ $target == dso ]]; then
            port=$(lt_port)
            lt_dso mylong "$port" "127.0.0.1:$ma" --drain-ms $(((secs + 60) * 1000))
            lt_swap_loop mylong "127.0.0.1:$mb" "127.0.0.1:$ma" 2 "$swaps" $(((secs + 60) * 1000)) &
            loop=$!
        fi
        lt_log "blue-green mariadb: sysbench oltp_read_only persistent, $target"
        rc=0
        sysbench oltp_read_only "${sb[@]}" --mysql-port="$port" --threads=16 --time="$secs" \
            --report-interval=0 --percentile=99 run >"$LT_OUT/logs/sysbench-$target.txt" 2>&1 || rc=$?
        [[ $target == dso ]] && { wait "$loop" || true; lt_dso_stop mylong; }
        local f="$LT_OUT/logs/sysbench-$target.txt"
        lt_row bluegreen_mariadb_sysbench "$target" 1 sysbench_exit "$rc"
        lt_row bluegreen_mariadb_sysbench "$target" 1 tps "$(awk '/transactions:/ {gsub(/\(/,"",$3); print $3}' "$f")"
        lt_row bluegreen_mariadb_sysbench "$target" 1 errors "$(awk '/ignored errors:/ {print $3}' "$f")"
        lt_row bluegreen_mariadb_sysbench "$target" 1 reconnects "$(awk '/reconnects:/ {print $2}' "$f")"
        lt_row bluegreen_mariadb_sysbench "$target" 1 p99_ms "$(awk '/99th percentile:/ {print $3}' "$f")"
    done
    lt_my_stop "$LT_SCRATCH/mya"
    lt_my_stop "$LT_SCRATCH/myb"
}

# 2. Restart with hold: pause, restart PostgreSQL, resume, under connection-per-transaction
# load. The smart stop lets sessions in flight finish (none new arrive: the listener holds).
sc_restart_hold() {
    lt_setup_pg
    local secs=${1:-24} p rc=0
    p=$(lt_port)
    lt_dso hold "$p" "127.0.0.1:$PG_A" --hold-max-ms 30000
    lt_log "restart with hold: pgbench -C -S 8 clients ${secs}s, restart at t+8s"
    # One pgbench thread per client: pgbench connects synchronously, so a held connect
    # would otherwise stall the other clients of its thread with their sessions open, and
    # the smart stop would wait for them (until the hold expires).
    lt_pgbench_run restart_hold "$p" -C -S -c 8 -j 8 -T "$secs" -n &
    local bench=$!
    sleep 8
    local t0=$EPOCHREALTIME
    lt_ctl hold pause 30000 >/dev/null
    # Connections dialed just before the pause are still in PostgreSQL's startup phase;
    # a smart stop refuses them ("the database system is shutting down"). Let them start
    # their sessions first (seen in a run without this wait: 4 aborted clients).
    sleep 0.5
    lt_pg_stop "$LT_SCRATCH/pga" smart
    lt_pg_start "$LT_SCRATCH/pga" "$PG_A"
    lt_ctl hold resume >/dev/null
    local held_ms
    held_ms=$(python3 -c "print(round(($EPOCHREALTIME - $t0) * 1000))")
    wait "$bench" || rc=$?
    cp "$LT_SCRATCH/events-hold.csv" "$LT_OUT/logs/events-restart_hold.csv"
    lt_row restart_hold dso 1 pgbench_exit "$rc"
    lt_row restart_hold dso 1 pause_to_resume_ms "$held_ms"
    lt_pgbench_rows restart_hold dso 1 restart_hold "$LT_OUT/logs/events-restart_hold.csv"
    lt_ctl hold stats >"$LT_OUT/logs/stats-restart_hold.json" || true
    lt_dso_stop hold
}

# Starts the comparison targets in front of backend $1 (host:port): dso, HAProxy, socat.
# Sets T_direct T_dso T_haproxy T_socat (ports) and DSO_PID_cmp, HAPROXY_PID.
lt_targets() {
    T_direct=${1##*:}
    T_dso=$(lt_port)
    lt_dso cmp "$T_dso" "$1" >/dev/null
    T_haproxy=$(lt_port)
    lt_haproxy "$T_haproxy" "$1" "${2:-4096}"
    T_socat=$(lt_port)
    lt_socat "$T_socat" "$1"
    # A second dso build side by side (before/after comparisons in one run): LT_DSO_B.
    if [[ -n "${LT_DSO_B:-}" ]]; then
        T_dso_b=$(lt_port)
        DSO_BIN=$LT_DSO_B lt_dso cmpb "$T_dso_b" "$1" >/dev/null
    fi
}

# The targets of the side-by-side scenarios, in the order they run each round.
lt_target_names() {
    echo direct dso ${LT_DSO_B:+dso_b} haproxy socat
}

lt_targets_stop() {
    lt_dso_stop cmp
    [[ -n "${LT_DSO_B:-}" ]] && DSO_BIN=$LT_DSO_B lt_dso_stop cmpb
    kill "$HAPROXY_PID" 2>/dev/null || true
    lt_socat_stop
}

# Stops the socat listener we started (its per-connection children end with their
# connections, which are all closed by then).
lt_socat_stop() {
    local pid
    for pid in "${LT_PIDS[@]}"; do
        if [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == socat ]]; then
            kill "$pid" 2>/dev/null || true
        fi
    done
}

# 3. Throughput: iperf3 1 and 4 streams through each target, rounds interleaved.
sc_throughput() {
    local ip r streams t
    ip=$(lt_port)
    iperf3 -s -B 127.0.0.1 -p "$ip" >/dev/null 2>&1 &
    LT_PIDS+=($!)
    lt_wait_port "$ip"
    lt_targets "127.0.0.1:$ip"
    for ((r = 1; r <= LT_ROUNDS; r++)); do
        for streams in 1 4; do
            for t in direct dso haproxy socat; do
                local port="T_$t" out="$LT_OUT/logs/iperf3-$t-P$streams-r$r.json"
                iperf3 -c 127.0.0.1 -p "${!port}" -t "$LT_SECS" -P "$streams" -J >"$out" 2>&1 || true
                local gbps
                gbps=$(python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print(round(d["end"]["sum_received"]["bits_per_second"]/1e9,2))' "$out" 2>/dev/null || echo NaN)
                lt_log "iperf3 P$streams round $r $t: $gbps Gbit/s"
                lt_row throughput_P$streams "$t" "$r" gbps "$gbps"
            done
        done
    done
    lt_targets_stop
}

# 4. Request/response: pgbench -S, 16 clients, through each target.
sc_pgbench_s() {
    lt_setup_pg
    lt_targets "127.0.0.1:$PG_A"
    local r t
    for ((r = 1; r <= LT_ROUNDS; r++)); do
        for t in direct dso haproxy socat; do
            local port="T_$t" rc=0
            lt_pgbench_run "S_${t}_r$r" "${!port}" -S -c 16 -j 2 -T "$LT_SECS" -n || rc=$?
            lt_row pgbench_S "$t" "$r" pgbench_exit "$rc"
            local tps failed aborted lat
            read -r tps failed aborted lat < <(lt_pgbench_figures "$LT_OUT/logs/S_${t}_r$r.txt")
            lt_log "pgbench -S round $r $t: $tps tps, $lat ms"
            lt_row pgbench_S "$t" "$r" tps "$tps"
            lt_row pgbench_S "$t" "$r" lat_avg_ms "$lat"
            rm -f "$LT_OUT/logs/pgbench/S_${t}_r$r".*
        done
    done
    lt_targets_stop
}

# 5. Connection rate: connect, 1-byte echo, close, 16 workers, through each target.
sc_connrate() {
    local echo r t
    echo=$(lt_port)
    "$DSO_LOAD" echo --listen "127.0.0.1:$echo" --max-seconds 1800 &
    LT_PIDS+=($!)
    lt_wait_port "$echo"
    lt_targets "127.0.0.1:$echo"
    for ((r = 1; r <= LT_ROUNDS; r++)); do
        for t in direct dso haproxy socat; do
            local port="T_$t" line
            line=$("$DSO_LOAD" connrate --target "127.0.0.1:${!port}" --seconds "$LT_SECS" --concurrency 16 --label "$t")
            lt_log "connrate round $r: $line"
            IFS=, read -r _ ok errors _ rate c50 c99 p50 p99 <<<"$line"
            lt_row connrate "$t" "$r" conns "$ok"
            lt_row connrate "$t" "$r" errors "$errors"
            lt_row connrate "$t" "$r" conns_per_s "$rate"
            lt_row connrate "$t" "$r" connect_p50_us "$c50"
            lt_row connrate "$t" "$r" connect_p99_us "$c99"
            lt_row connrate "$t" "$r" ping_p50_us "$p50"
            lt_row connrate "$t" "$r" ping_p99_us "$p99"
            sleep 2
        done
    done
    lt_targets_stop
}

# 6. Memory: RSS of dso and of HAProxy holding $LT_IDLE idle proxied connections.
sc_memory() {
    local echo t
    echo=$(lt_port)
    "$DSO_LOAD" echo --listen "127.0.0.1:$echo" --max-seconds 1800 &
    LT_PIDS+=($!)
    lt_wait_port "$echo"
    for t in dso haproxy; do
        local port pid
        port=$(lt_port)
        if [[ $t == dso ]]; then
            lt_dso mem "$port" "127.0.0.1:$echo"
            pid=$DSO_PID_mem
        else
            lt_haproxy "$port" "127.0.0.1:$echo" $((LT_IDLE + 50))
            pid=$HAPROXY_PID
        fi
        # Warm up the process (one connection) before the baseline reading.
        "$DSO_LOAD" idle --target "127.0.0.1:$port" --count 1 --ready-file "$LT_SCRATCH/warm" --hold-seconds 0 >/dev/null
        sleep 1
        local before after ready="$LT_SCRATCH/ready-$t"
        before=$(lt_rss_kib "$pid")
        "$DSO_LOAD" idle --target "127.0.0.1:$port" --count "$LT_IDLE" --ready-file "$ready" --hold-seconds 30 >/dev/null &
        local idle=$!
        local i
        for ((i = 0; i < 600; i++)); do [[ -f $ready ]] && break; sleep 0.1; done
        sleep 3
        after=$(lt_rss_kib "$pid")
        local ok=0
        [[ -f $ready ]] && ok=$(cat "$ready")
        kill "$idle" 2>/dev/null || true
        wait "$idle" 2>/dev/null || true
        lt_log "memory $t: $ok idle connections, RSS ${before} KiB -> ${after} KiB"
        lt_row memory "$t" 1 idle_connections "$ok"
        lt_row memory "$t" 1 rss_before_kib "$before"
        lt_row memory "$t" 1 rss_after_kib "$after"
        lt_row memory "$t" 1 bytes_per_conn $(((after - before) * 1024 / (ok > 0 ? ok : 1)))
        if [[ $t == dso ]]; then lt_dso_stop mem; else kill "$HAPROXY_PID"; wait "$HAPROXY_PID" 2>/dev/null || true; fi
        sleep 2
    done
}

# 7. CPU per round trip and per connection (issue 13): the proxy's own CPU time from
# /proc/PID/stat (all threads; socat's reaped children included) over a fixed amount of
# work, for dso, HAProxy and socat side by side, rounds interleaved, and direct for the
# throughput ratios. Workloads: pgbench -S (16 clients, LT_CPU_TX transactions each),
# `dso-load pingpong` (16 persistent connections, LT_CPU_RT round trips of 64 bytes each,
# to `dso-load echo`), `dso-load connrate` (connect, 1-byte echo, close; LT_CPU_CONN_SECS).
# Then, unless LT_STRACE=0, system calls per pgbench transaction from `strace -c -f` on dso
# and HAProxy (LT_STRACE_TX transactions per client, 16 clients). Every figure row carries
# the 1-minute load average taken just before it (metric load1). With LT_DSO_B=PATH a
# second dso binary runs as target dso_b in the same rounds (before/after comparisons).
: "${LT_CPU_TX:=2000}"
: "${LT_CPU_RT:=2000}"
: "${LT_CPU_CONN_SECS:=4}"
: "${LT_STRACE:=1}"
: "${LT_STRACE_TX:=500}"
sc_cpu_rt() {
    lt_setup_pg
    local hz r t
    hz=$(getconf CLK_TCK)
    # Which process does the forwarding for each target (direct: none).
    lt_cpu_pid() {
        case $1 in
        dso) echo "$DSO_PID_cmp" ;;
        dso_b) echo "$DSO_PID_cmpb" ;;
        haproxy) echo "$HAPROXY_PID" ;;
        socat) echo "$SOCAT_PID" ;;
        *) echo "" ;;
        esac
    }
    # Milliseconds of CPU between two tick readings.
    lt_ticks_ms() { python3 -c "print(round(($2 - $1) * 1000 / $hz, 1))"; }

    lt_targets "127.0.0.1:$PG_A"
    for ((r = 1; r <= LT_ROUNDS; r++)); do
        for t in $(lt_target_names); do
            local port="T_$t" pid c0=0 c1=0 rc=0 load
            pid=$(lt_cpu_pid "$t")
            load=$(lt_load1)
            [[ -n $pid ]] && c0=$(lt_cpu_ticks "$pid")
            lt_pgbench "${!port}" -S -c 16 -j 2 -t "$LT_CPU_TX" -n >"$LT_OUT/logs/cpu_S_${t}_r$r.txt" 2>&1 || rc=$?
            # socat's children are reaped (and their time added) after their connections end.
            [[ $t == socat ]] && sleep 1
            [[ -n $pid ]] && c1=$(lt_cpu_ticks "$pid")
            local tps tx
            read -r tps _ _ _ < <(lt_pgbench_figures "$LT_OUT/logs/cpu_S_${t}_r$r.txt")
            tx=$(awk -F'[:/ ]+' '/number of transactions actually processed/ {print $6}' "$LT_OUT/logs/cpu_S_${t}_r$r.txt")
            lt_row cpu_rt_pgbench_S "$t" "$r" load1 "$load"
            lt_row cpu_rt_pgbench_S "$t" "$r" pgbench_exit "$rc"
            lt_row cpu_rt_pgbench_S "$t" "$r" tx "${tx:-0}"
            lt_row cpu_rt_pgbench_S "$t" "$r" tps "$tps"
            if [[ -n $pid ]]; then
                local ms
                ms=$(lt_ticks_ms "$c0" "$c1")
                lt_row cpu_rt_pgbench_S "$t" "$r" cpu_ms "$ms"
                lt_row cpu_rt_pgbench_S "$t" "$r" cpu_ms_per_1k_tx "$(python3 -c "print(round($ms * 1000 / max(${tx:-0}, 1), 2))")"
                lt_log "cpu_rt pgbench -S round $r $t: $tx tx, $tps tps, ${ms} ms CPU (load $load)"
            else
                lt_log "cpu_rt pgbench -S round $r $t: $tx tx, $tps tps (load $load)"
            fi
        done
    done
    if ((LT_STRACE)) && command -v strace >/dev/null; then
        for t in dso ${LT_DSO_B:+dso_b} haproxy; do
            local port="T_$t" pid out="$LT_OUT/logs/strace-$t.txt" st rc=0
            pid=$(lt_cpu_pid "$t")
            strace -c -f -q -p "$pid" -o "$out" &
            st=$!
            sleep 1
            lt_pgbench "${!port}" -S -c 16 -j 2 -t "$LT_STRACE_TX" -n >"$LT_OUT/logs/strace_S_$t.txt" 2>&1 || rc=$?
            kill -INT "$st" 2>/dev/null || true
            wait "$st" 2>/dev/null || true
            local tx
            tx=$(awk -F'[:/ ]+' '/number of transactions actually processed/ {print $6}' "$LT_OUT/logs/strace_S_$t.txt")
            lt_row cpu_rt_strace "$t" 1 tx "${tx:-0}"
            lt_row cpu_rt_strace "$t" 1 pgbench_exit "$rc"
            # `calls` is the 4th column of strace -c's table; the name is the last.
            awk -v tx="${tx:-0}" '$1 ~ /^[0-9.]+$/ && NF >= 5 && $NF != "total" {printf "%s %.3f\n", $NF, $4 / (tx > 0 ? tx : 1)}
                $NF == "total" {printf "total %.3f\n", $4 / (tx > 0 ? tx : 1)}' "$out" |
                while read -r call per; do lt_row cpu_rt_strace "$t" 1 "syscalls_per_tx_$call" "$per"; done
            lt_log "cpu_rt strace $t: $(awk '$NF == "total" {print $4}' "$out") system calls for $tx transactions"
        done
    fi
    lt_targets_stop

    local echo
    echo=$(lt_port)
    "$DSO_LOAD" echo --listen "127.0.0.1:$echo" --max-seconds 1800 &
    LT_PIDS+=($!)
    lt_wait_port "$echo"
    lt_targets "127.0.0.1:$echo"
    for ((r = 1; r <= LT_ROUNDS; r++)); do
        for t in $(lt_target_names); do
            local port="T_$t" pid c0=0 c1=0 line load
            pid=$(lt_cpu_pid "$t")
            load=$(lt_load1)
            [[ -n $pid ]] && c0=$(lt_cpu_ticks "$pid")
            line=$("$DSO_LOAD" pingpong --target "127.0.0.1:${!port}" --connections 16 --count "$LT_CPU_RT" --size 64 --label "$t")
            [[ $t == socat ]] && sleep 1
            [[ -n $pid ]] && c1=$(lt_cpu_ticks "$pid")
            local n errors rate p50 p99
            IFS=, read -r _ n errors _ rate p50 p99 <<<"$line"
            lt_row cpu_rt_pingpong "$t" "$r" load1 "$load"
            lt_row cpu_rt_pingpong "$t" "$r" round_trips "$n"
            lt_row cpu_rt_pingpong "$t" "$r" errors "$errors"
            lt_row cpu_rt_pingpong "$t" "$r" round_trips_per_s "$rate"
            lt_row cpu_rt_pingpong "$t" "$r" rt_p50_us "$p50"
            lt_row cpu_rt_pingpong "$t" "$r" rt_p99_us "$p99"
            if [[ -n $pid ]]; then
                local ms
                ms=$(lt_ticks_ms "$c0" "$c1")
                lt_row cpu_rt_pingpong "$t" "$r" cpu_ms "$ms"
                lt_row cpu_rt_pingpong "$t" "$r" cpu_us_per_rt "$(python3 -c "print(round($ms * 1000 / max($n, 1), 2))")"
            fi
            lt_log "cpu_rt pingpong round $r: $line; ${c0}..${c1} ticks (load $load)"

            load=$(lt_load1)
            [[ -n $pid ]] && c0=$(lt_cpu_ticks "$pid")
            line=$("$DSO_LOAD" connrate --target "127.0.0.1:${!port}" --seconds "$LT_CPU_CONN_SECS" --concurrency 16 --label "$t")
            [[ $t == socat ]] && sleep 1
            [[ -n $pid ]] && c1=$(lt_cpu_ticks "$pid")
            local ok c50 c99
            IFS=, read -r _ ok errors _ rate c50 c99 p50 p99 <<<"$line"
            lt_row cpu_rt_connrate "$t" "$r" load1 "$load"
            lt_row cpu_rt_connrate "$t" "$r" conns "$ok"
            lt_row cpu_rt_connrate "$t" "$r" errors "$errors"
            lt_row cpu_rt_connrate "$t" "$r" conns_per_s "$rate"
            if [[ -n $pid ]]; then
                local ms
                ms=$(lt_ticks_ms "$c0" "$c1")
                lt_row cpu_rt_connrate "$t" "$r" cpu_ms "$ms"
                lt_row cpu_rt_connrate "$t" "$r" cpu_us_per_conn "$(python3 -c "print(round($ms * 1000 / max($ok, 1), 2))")"
            fi
            lt_log "cpu_rt connrate round $r: $line; ${c0}..${c1} ticks (load $load)"
            # Let TIME_WAIT and socat's children settle before the next target.
            sleep 1
        done
    done
    lt_targets_stop
}
