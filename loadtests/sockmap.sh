# The sockmap evaluation (issue 13): CPU per small round trip and iperf3 one stream for
# direct, HAProxy, dso's user-space path and the sockmap fast path (dso-sockmap-forward),
# side by side in one run. Sourced by run.sh after scenarios.sh; needs root (the fast
# path loads a BPF program).
#
# Per target and round: pgbench -S, 16 clients, 2 threads, a fixed transaction count
# (LT_SM_TX per client, default 2000). CPU is read as jiffies (1/100 s) before and after:
#   proxy_ms     utime+stime of the proxy process (every thread);
#   kworker_ms   utime+stime of the kworker threads, per thread between two snapshots
#                (the fast path's redirect queue is drained by a kworker: sk_psock_backlog);
#   postgres_ms  the postmaster's cutime+cstime (its backends, reaped after the run);
#   pgbench_ms   pgbench's user+sys (/usr/bin/time);
#   softirq_ms   the whole machine's softirq time (/proc/stat; this kernel accounts it
#                apart from tasks, and on loopback the receive path runs there);
#   machine_ms   the whole machine's busy time (/proc/stat, every column but idle and
#                iowait): includes other engineers' builds, so read it with the load average.
# Each is also divided per 1,000 transactions (`*_per_1k_ms`).

: "${LT_SM_TX:=2000}"
: "${DSO_SOCKMAP:=$LT_REPO/target/release/dso-sockmap-forward}"

# utime+stime (+ cutime+cstime with "all") of a process, in jiffies.
lt_sm_jiffies() {
    awk -v all="${2:-}" '{ sub(/^.*\) /, ""); t = $12 + $13; if (all == "all") t += $14 + $15; print t }' "/proc/$1/stat"
}

# Writes "tid jiffies" (utime+stime) of every kworker thread that exists now to file $1.
lt_sm_kworkers_snap() {
    local f
    for f in /proc/[0-9]*/task/[0-9]*/stat; do
        awk '$2 ~ /^\(kworker/ { sub(/^.*\) /, ""); split(FILENAME, p, "/"); print p[5], $12 + $13 }' "$f" 2>/dev/null || true
    done >"$1"
}

# kworker jiffies between two snapshots: the delta of each thread in both, plus the whole
# time of threads that appeared (threads that ended in between are lost: a lower bound).
lt_sm_kworkers_delta() {
    awk 'NR == FNR { a[$1] = $2; next } { d += $2 - (($1 in a) ? a[$1] : 0) } END { print d + 0 }' "$1" "$2"
}

# "busy softirq" jiffies of the whole machine.
lt_sm_machine() {
    awk '/^cpu / { print $2 + $3 + $4 + $7 + $8 + $9, $8 }' /proc/stat
}

lt_sm_start_forward() {
    "$DSO_SOCKMAP" "127.0.0.1:$1" "$2" >"$LT_SCRATCH/sockmap-$1.log" 2>&1 &
    LT_PIDS+=($!)
    SOCKMAP_PID=$!
    lt_wait_port "$1"
}

sc_sockmap() {
    lt_setup_pg
    if ! "$DSO_SOCKMAP" --probe >"$LT_OUT/logs/sockmap-probe.txt"; then
        lt_log "sockmap: $(cat "$LT_OUT/logs/sockmap-probe.txt"); scenario skipped"
        lt_row sockmap_pgbench_S sockmap 1 available 0
        return 0
    fi
    local pg="127.0.0.1:$PG_A" master
    master=$(head -1 "$LT_SCRATCH/pga/postmaster.pid")
    local T_direct=$PG_A T_dso T_haproxy T_sockmap
    T_dso=$(lt_port)
    lt_dso smdso "$T_dso" "$pg" >/dev/null
    T_haproxy=$(lt_port)
    lt_haproxy "$T_haproxy" "$pg"
    local pid_haproxy=$HAPROXY_PID
    T_sockmap=$(lt_port)
    lt_sm_start_forward "$T_sockmap" "$pg"
    local pid_dso=$DSO_PID_smdso pid_sockmap=$SOCKMAP_PID pid_direct=
    local r t tx=$((LT_SM_TX * 16))
    for ((r = 1; r <= LT_ROUNDS; r++)); do
        for t in direct dso haproxy sockmap; do
            local port="T_$t" pidv="pid_$t" out="$LT_OUT/logs/sm_S_${t}_r$r.txt"
            local p0=0 p1=0 k0 k1 g0 g1 m0 s0 m1 s1 load
            load=$(cut -d' ' -f1 /proc/loadavg)
            [[ -n ${!pidv} ]] && p0=$(lt_sm_jiffies "${!pidv}")
            lt_sm_kworkers_snap "$LT_SCRATCH/kw0"
            g0=$(lt_sm_jiffies "$master" all)
            read -r m0 s0 < <(lt_sm_machine)
            local rc=0
            /usr/bin/time -f 'pgbench_cpu %U %S' -o "$out.time" \
                runuser -u postgres -- "$PG_BIN/pgbench" -h 127.0.0.1 -p "${!port}" -U postgres \
                -S -c 16 -j 2 -t "$LT_SM_TX" -n postgres >"$out" 2>&1 || rc=$?
            read -r m1 s1 < <(lt_sm_machine)
            sleep 0.5
            [[ -n ${!pidv} ]] && p1=$(lt_sm_jiffies "${!pidv}")
            lt_sm_kworkers_snap "$LT_SCRATCH/kw1"
            k0=0 k1=$(lt_sm_kworkers_delta "$LT_SCRATCH/kw0" "$LT_SCRATCH/kw1")
            g1=$(lt_sm_jiffies "$master" all)
            local tps failed aborted lat pgb
            read -r tps failed aborted lat < <(lt_pgbench_figures "$out")
            pgb=$(awk '/pgbench_cpu/ { printf "%d", ($2 + $3) * 1000 }' "$out.time")
            local s=sockmap_pgbench_S
            lt_row $s "$t" "$r" pgbench_exit "$rc"
            lt_row $s "$t" "$r" load_avg "$load"
            lt_row $s "$t" "$r" transactions "$tx"
            lt_row $s "$t" "$r" tps "$tps"
            lt_row $s "$t" "$r" lat_avg_ms "$lat"
            lt_row $s "$t" "$r" failed_tx "$failed"
            local name v
            for name in proxy kworker postgres softirq machine; do
                case $name in
                proxy) v=$(((p1 - p0) * 10)) ;;
                kworker) v=$(((k1 - k0) * 10)) ;;
                postgres) v=$(((g1 - g0) * 10)) ;;
                softirq) v=$(((s1 - s0) * 10)) ;;
                machine) v=$(((m1 - m0) * 10)) ;;
                esac
                lt_row $s "$t" "$r" "${name}_ms" "$v"
                lt_row $s "$t" "$r" "${name}_per_1k_ms" "$(python3 -c "print(round($v * 1000 / $tx, 2))")"
            done
            lt_row $s "$t" "$r" pgbench_ms "$pgb"
            lt_row $s "$t" "$r" pgbench_per_1k_ms "$(python3 -c "print(round($pgb * 1000 / $tx, 2))")"
            lt_log "sockmap pgbench -S round $r $t: $tps tps, proxy $(((p1 - p0) * 10)) ms, kworker $(((k1 - k0) * 10)) ms, softirq $(((s1 - s0) * 10)) ms, machine $(((m1 - m0) * 10)) ms, load $load"
        done
    done
    lt_ctl smdso stats >"$LT_OUT/logs/stats-sockmap-dso.json" || true

    # iperf3, one stream, through each target.
    local ip
    ip=$(lt_port)
    iperf3 -s -B 127.0.0.1 -p "$ip" >/dev/null 2>&1 &
    LT_PIDS+=($!)
    lt_wait_port "$ip"
    local I_direct=$ip I_dso I_haproxy I_sockmap
    I_dso=$(lt_port)
    lt_dso smip "$I_dso" "127.0.0.1:$ip" >/dev/null
    I_haproxy=$(lt_port)
    lt_haproxy "$I_haproxy" "127.0.0.1:$ip"
    local ip_haproxy=$HAPROXY_PID
    I_sockmap=$(lt_port)
    lt_sm_start_forward "$I_sockmap" "127.0.0.1:$ip"
    for ((r = 1; r <= LT_ROUNDS; r++)); do
        for t in direct dso haproxy sockmap; do
            local port="I_$t" out="$LT_OUT/logs/sm_iperf3-$t-r$r.json" gbps load
            load=$(cut -d' ' -f1 /proc/loadavg)
            iperf3 -c 127.0.0.1 -p "${!port}" -t "$LT_SECS" -P 1 -J >"$out" 2>&1 || true
            gbps=$(python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print(round(d["end"]["sum_received"]["bits_per_second"]/1e9,2))' "$out" 2>/dev/null || echo NaN)
            lt_log "sockmap iperf3 P1 round $r $t: $gbps Gbit/s (load $load)"
            lt_row sockmap_iperf3_P1 "$t" "$r" gbps "$gbps"
            lt_row sockmap_iperf3_P1 "$t" "$r" load_avg "$load"
        done
    done
    lt_dso_stop smdso
    lt_dso_stop smip
    kill "$pid_haproxy" "$ip_haproxy" "$pid_sockmap" "$SOCKMAP_PID" 2>/dev/null || true
}
