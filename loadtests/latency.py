#!/usr/bin/env python3
"""Latency split of a pgbench run around proxy events.

usage: latency.py LOGDIR NAME [EVENTS_CSV]

Reads pgbench's per-transaction logs LOGDIR/NAME.* (lines `client tx latency_us script
epoch_s epoch_us`, the epoch being the transaction's end) and, when given, the proxy
driver's events CSV (`epoch_us,event,detail`). A transaction is "in a window" when it
started within 1 s after a swap, or between a pause and 1 s after the following resume.
Prints `metric value` lines: counts, p50/p99/max in milliseconds, steady and in windows.
"""
import glob
import sys

WINDOW_S = 1.0


def pct(values, q):
    if not values:
        return "NaN"
    values = sorted(values)
    i = min(len(values) - 1, max(0, int(round(q * len(values) + 0.5)) - 1))
    return f"{values[i]:.2f}"


def main():
    logdir, name = sys.argv[1], sys.argv[2]
    events = sys.argv[3] if len(sys.argv) > 3 and sys.argv[3] else None
    windows = []
    if events:
        pause = None
        for line in open(events):
            parts = line.strip().split(",", 2)
            if len(parts) < 2 or not parts[0].isdigit():
                continue
            t = int(parts[0]) / 1e6
            if parts[1] == "swap":
                windows.append((t, t + WINDOW_S))
            elif parts[1] == "pause":
                pause = t
            elif parts[1] == "resume" and pause is not None:
                windows.append((pause, t + WINDOW_S))
                pause = None
    steady, inwin, failed = [], [], 0
    for path in glob.glob(f"{logdir}/{name}.*"):
        for line in open(path):
            f = line.split()
            if len(f) < 6:
                continue
            if not f[2].isdigit():
                failed += 1
                continue
            lat_ms = int(f[2]) / 1000.0
            end = int(f[4]) + int(f[5]) / 1e6
            start = end - lat_ms / 1000.0
            if any(a <= start < b for a, b in windows):
                inwin.append(lat_ms)
            else:
                steady.append(lat_ms)
    print("tx_logged", len(steady) + len(inwin))
    print("tx_logged_failed", failed)
    print("windows", len(windows))
    print("p50_ms_steady", pct(steady, 0.50))
    print("p99_ms_steady", pct(steady, 0.99))
    print("tx_in_windows", len(inwin))
    print("p50_ms_in_windows", pct(inwin, 0.50))
    print("p99_ms_in_windows", pct(inwin, 0.99))
    print("max_ms_in_windows", pct(inwin, 1.0))
    print("max_ms_steady", pct(steady, 1.0))


if __name__ == "__main__":
    main()
