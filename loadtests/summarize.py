#!/usr/bin/env python3
"""Turns a run's results.csv into summary.md (markdown tables and the issue's targets).

usage: summarize.py RESULTS_CSV
"""
import csv
import statistics
import sys
from collections import defaultdict

TARGETS = ["direct", "dso", "dso_b", "haproxy", "socat"]


def num(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def load(path):
    rows = defaultdict(lambda: defaultdict(dict))  # scenario -> (target, round) -> metric -> value
    for r in csv.DictReader(open(path)):
        rows[r["scenario"]][(r["target"], r["round"])][r["metric"]] = r["value"]
    return rows


def per_round(rows, scenario, metric):
    """target -> [value per round], rounds in order."""
    out = defaultdict(list)
    for (target, rnd), m in sorted(rows.get(scenario, {}).items(), key=lambda kv: int(kv[0][1])):
        if metric in m:
            out[target].append(num(m[metric]))
    return out


def fmt(x, d=2):
    return "—" if x != x else f"{x:,.{d}f}"


def ratio_table(rows, scenario, metric, unit, higher_better=True, digits=2):
    vals = per_round(rows, scenario, metric)
    if not vals:
        return None, {}
    lines = [f"| target | {unit} per round | mean | ratio to direct (per round) | mean ratio |", "|---|---|---|---|---|"]
    direct = vals.get("direct", [])
    means = {}
    for t in TARGETS:
        if t not in vals:
            continue
        v = vals[t]
        ratios = [a / b if b else float("nan") for a, b in zip(v, direct)]
        means[t] = (statistics.mean(v), statistics.mean(ratios) if ratios else float("nan"), ratios, v)
        lines.append(
            f"| {t} | {', '.join(fmt(x, digits) for x in v)} | {fmt(means[t][0], digits)} | "
            f"{', '.join(fmt(r) for r in ratios)} | {fmt(means[t][1])} |"
        )
    return "\n".join(lines), means


def vs(means, a, b):
    """Per-round ratio a/b and its mean."""
    if a not in means or b not in means:
        return [], float("nan")
    r = [x / y if y else float("nan") for x, y in zip(means[a][3], means[b][3])]
    return r, statistics.mean(r) if r else float("nan")


def main():
    rows = load(sys.argv[1])
    out = []
    verdicts = []

    def section(title):
        out.append(f"\n### {title}\n")

    # Zero-downtime scenarios.
    bg = [s for s in rows if s.startswith("bluegreen_") or s == "restart_hold"]
    if bg:
        section("Zero downtime (scenarios 1 and 2)")
        out.append("| run | target | exit | swaps | failed tx | aborted clients | errors | tps | p99 steady ms | p99 in swap windows ms | max in windows ms |")
        out.append("|---|---|---|---|---|---|---|---|---|---|---|")
        for s in sorted(bg):
            for (t, _), m in sorted(rows[s].items()):
                exit_code = m.get("pgbench_exit", m.get("sysbench_exit", ""))
                errors = m.get("errors", m.get("failed_runs", ""))
                tps = m.get("tps", m.get("queries_per_s", ""))
                out.append(
                    f"| {s} | {t} | {exit_code} | {m.get('swaps', m.get('windows', ''))} | {m.get('failed_tx', '')} | "
                    f"{m.get('aborted_clients', '')} | {errors} | {tps} | {m.get('p99_ms_steady', m.get('p99_ms', ''))} | "
                    f"{m.get('p99_ms_in_windows', '')} | {m.get('max_ms_in_windows', '')} |"
                )
                if s == "restart_hold" and "pause_to_resume_ms" in m:
                    out.append(f"\nRestart with hold: pause to resume took {m['pause_to_resume_ms']} ms.\n")

    for streams in ("1", "4"):
        table, means = ratio_table(rows, f"throughput_P{streams}", "gbps", "Gbit/s")
        if table:
            section(f"Throughput, iperf3 {streams} stream(s)")
            out.append(table)
            r, m = vs(means, "dso", "haproxy")
            out.append(f"\ndso / HAProxy per round: {', '.join(fmt(x) for x in r)} (mean {fmt(m)})")
            if streams == "1":
                verdicts.append(("iperf3 1 stream >= 0.6x direct", means.get("dso", (0, float('nan')))[1], 0.6))
                verdicts.append(("iperf3 1 stream >= 1.3x HAProxy", m, 1.3))

    table, means = ratio_table(rows, "pgbench_S", "tps", "tps", digits=0)
    if table:
        section("Request/response, pgbench -S, 16 clients")
        out.append(table)
        lat, _ = ratio_table(rows, "pgbench_S", "lat_avg_ms", "latency ms", digits=3)
        out.append("\n" + lat)
        r, m = vs(means, "dso", "haproxy")
        out.append(f"\ndso / HAProxy tps per round: {', '.join(fmt(x) for x in r)} (mean {fmt(m)})")
        verdicts.append(("pgbench -S >= 0.8x direct", means.get("dso", (0, float('nan')))[1], 0.8))
        verdicts.append(("pgbench -S above HAProxy", m, 1.0))

    table, means = ratio_table(rows, "connrate", "conns_per_s", "conn/s", digits=0)
    if table:
        section("Connection rate (connect, 1-byte echo, close; 16 workers)")
        out.append(table)
        out.append("\n| target | connect p50 µs | connect p99 µs | connect+echo p50 µs | connect+echo p99 µs | errors |")
        out.append("|---|---|---|---|---|---|")
        for t in TARGETS:
            cells = []
            for metric in ("connect_p50_us", "connect_p99_us", "ping_p50_us", "ping_p99_us", "errors"):
                v = per_round(rows, "connrate", metric).get(t, [])
                cells.append(", ".join(fmt(x, 0) for x in v))
            if any(cells):
                out.append(f"| {t} | " + " | ".join(cells) + " |")
        r, m = vs(means, "dso", "haproxy")
        out.append(f"\ndso / HAProxy conn/s per round: {', '.join(fmt(x) for x in r)} (mean {fmt(m)})")
        verdicts.append(("connection rate >= HAProxy", m, 1.0))

    if "memory" in rows:
        section("Memory with idle proxied connections")
        out.append("| process | idle connections | RSS before KiB | RSS after KiB | bytes per connection |")
        out.append("|---|---|---|---|---|")
        per = {}
        for (t, _), m in sorted(rows["memory"].items()):
            per[t] = num(m.get("bytes_per_conn"))
            out.append(f"| {t} | {m.get('idle_connections')} | {m.get('rss_before_kib')} | {m.get('rss_after_kib')} | {m.get('bytes_per_conn')} |")
        if "dso" in per and "haproxy" in per and per["dso"] == per["dso"]:
            verdicts.append(("memory per idle connection <= HAProxy", per["haproxy"] / per["dso"] if per["dso"] else float("inf"), 1.0))

    cpu_rt(rows, out, section)

    if verdicts:
        section("Targets (issue 3)")
        out.append("| target | measured | met |")
        out.append("|---|---|---|")
        for name, value, need in verdicts:
            met = "yes" if value == value and value >= need else "no"
            shown = f"{fmt(value)}x" if "memory" not in name else f"HAProxy/dso = {fmt(value)}"
            out.append(f"| {name} | {shown} | {met} |")
    print("\n".join(out).lstrip())


def cpu_rt(rows, out, section):
    """Scenario 7 (issue 13): CPU per round trip and per connection, dso against HAProxy."""
    work = [
        ("cpu_rt_pgbench_S", "cpu_ms_per_1k_tx", "CPU ms per 1,000 pgbench -S transactions", "tps", "tps"),
        ("cpu_rt_pingpong", "cpu_us_per_rt", "CPU µs per 64-byte round trip (pingpong)", "round_trips_per_s", "round trips/s"),
        ("cpu_rt_connrate", "cpu_us_per_conn", "CPU µs per connection (connect, 1-byte echo, close)", "conns_per_s", "conn/s"),
    ]
    if not any(w[0] in rows for w in work):
        return
    section("CPU per round trip and per connection (issue 13)")
    out.append("| workload | target | CPU per op, per round | rate per round | load average per round |")
    out.append("|---|---|---|---|---|")
    for scenario, cpu, what, rate, unit in work:
        cpus = per_round(rows, scenario, cpu)
        rates = per_round(rows, scenario, rate)
        loads = per_round(rows, scenario, "load1")
        for t in TARGETS:
            if t not in rates:
                continue
            c = ", ".join(fmt(x) for x in cpus.get(t, [])) or "—"
            out.append(f"| {what} | {t} | {c} | {', '.join(fmt(x, 0) for x in rates[t])} {unit} | "
                       f"{', '.join(fmt(x) for x in loads.get(t, []))} |")
    out.append("\n| ratio, per round (mean) | pgbench -S | pingpong | connrate |")
    out.append("|---|---|---|---|")
    for label, metric_of, a, b in [
        ("dso / HAProxy CPU per op", lambda w: w[1], "dso", "haproxy"),
        ("dso / socat CPU per op", lambda w: w[1], "dso", "socat"),
        ("dso / dso_b CPU per op", lambda w: w[1], "dso", "dso_b"),
        ("dso_b / HAProxy CPU per op", lambda w: w[1], "dso_b", "haproxy"),
        ("dso / HAProxy rate", lambda w: w[3], "dso", "haproxy"),
        ("dso / direct rate", lambda w: w[3], "dso", "direct"),
        ("HAProxy / direct rate", lambda w: w[3], "haproxy", "direct"),
    ]:
        cells = []
        for w in work:
            v = per_round(rows, w[0], metric_of(w))
            r = [x / y if y else float("nan") for x, y in zip(v.get(a, []), v.get(b, []))]
            cells.append(f"{', '.join(fmt(x) for x in r)} ({fmt(statistics.mean(r)) if r else '—'})")
        if all(c.startswith(" (") for c in cells):
            continue
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    if "cpu_rt_strace" in rows:
        out.append("\nSystem calls per pgbench -S transaction (`strace -c -f` on the proxy):\n")
        out.append("| target | transactions | total | per call |")
        out.append("|---|---|---|---|")
        for (t, _), m in sorted(rows["cpu_rt_strace"].items()):
            calls = sorted(((k[len("syscalls_per_tx_"):], num(v)) for k, v in m.items()
                            if k.startswith("syscalls_per_tx_") and k != "syscalls_per_tx_total"), key=lambda kv: -kv[1])
            shown = ", ".join(f"{k} {fmt(v)}" for k, v in calls if v >= 0.01)
            out.append(f"| {t} | {m.get('tx')} | {m.get('syscalls_per_tx_total')} | {shown} |")


if __name__ == "__main__":
    main()
