#!/usr/bin/env python3
"""The sockmap scenario's rows of results.csv as markdown: per round, each target's tps and
CPU per 1,000 transactions (proxy, kworkers, softirq, postgres, pgbench, machine), the
ratios against HAProxy and direct, and iperf3 one stream.

usage: sockmap_summary.py RESULTS_CSV
"""
import csv
import sys
from collections import defaultdict

TARGETS = ["direct", "dso", "haproxy", "sockmap"]
rows = defaultdict(dict)  # (scenario, target, round) -> metric -> value
for r in csv.DictReader(open(sys.argv[1])):
    if r["scenario"].startswith("sockmap_"):
        rows[(r["scenario"], r["target"], int(r["round"]))][r["metric"]] = r["value"]


def f(x):
    try:
        return float(x)
    except (TypeError, ValueError):
        return float("nan")


def ratio(a, b):
    return "—" if not b or b != b or a != a else f"{a / b:.2f}"


rounds = sorted({k[2] for k in rows if k[0] == "sockmap_pgbench_S"})
cols = ["tps", "proxy", "kworker", "softirq", "postgres", "pgbench", "machine"]
print("## pgbench -S, 16 clients, fixed transactions: CPU per 1,000 transactions (ms)\n")
print("| round | target | load | tps | proxy | kworker | softirq | postgres | pgbench | proxy+kworker+softirq | machine |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
for r in rounds:
    for t in TARGETS:
        m = rows.get(("sockmap_pgbench_S", t, r))
        if not m:
            continue
        v = {c: f(m.get(f"{c}_per_1k_ms")) for c in cols[1:]}
        moved = v["proxy"] + v["kworker"] + v["softirq"]
        print(f"| {r} | {t} | {m.get('load_avg')} | {f(m.get('tps')):,.0f} | {v['proxy']:.2f} | {v['kworker']:.2f} | "
              f"{v['softirq']:.2f} | {v['postgres']:.2f} | {v['pgbench']:.2f} | {moved:.2f} | {v['machine']:.2f} |")
print("\nRatios within each round (sockmap / HAProxy, dso / HAProxy, sockmap / dso; tps vs direct):\n")
print("| round | proxy CPU sockmap/haproxy | proxy+kworker+softirq sockmap/haproxy | dso/haproxy (proxy CPU) | tps sockmap/haproxy | tps sockmap/direct | tps dso/direct | tps haproxy/direct |")
print("|---|---|---|---|---|---|---|---|")
for r in rounds:
    g = lambda t, c: f(rows.get(("sockmap_pgbench_S", t, r), {}).get(c))
    tot = lambda t: g(t, "proxy_per_1k_ms") + g(t, "kworker_per_1k_ms") + g(t, "softirq_per_1k_ms")
    print(f"| {r} | {ratio(g('sockmap', 'proxy_per_1k_ms'), g('haproxy', 'proxy_per_1k_ms'))} | "
          f"{ratio(tot('sockmap'), tot('haproxy'))} | {ratio(g('dso', 'proxy_per_1k_ms'), g('haproxy', 'proxy_per_1k_ms'))} | "
          f"{ratio(g('sockmap', 'tps'), g('haproxy', 'tps'))} | {ratio(g('sockmap', 'tps'), g('direct', 'tps'))} | "
          f"{ratio(g('dso', 'tps'), g('direct', 'tps'))} | {ratio(g('haproxy', 'tps'), g('direct', 'tps'))} |")
print("\n## iperf3, one stream (Gbit/s)\n")
print("| round | " + " | ".join(TARGETS) + " | sockmap/direct | dso/direct | haproxy/direct |")
print("|---" * (len(TARGETS) + 4) + "|")
for r in sorted({k[2] for k in rows if k[0] == "sockmap_iperf3_P1"}):
    g = {t: f(rows.get(("sockmap_iperf3_P1", t, r), {}).get("gbps")) for t in TARGETS}
    print(f"| {r} | " + " | ".join(f"{g[t]:.2f}" for t in TARGETS) +
          f" | {ratio(g['sockmap'], g['direct'])} | {ratio(g['dso'], g['direct'])} | {ratio(g['haproxy'], g['direct'])} |")
