//! The `dso proxy status` table, built only from the agent's snapshot.

use dso_proxy::{GenerationPhase, ListenerSnapshot, ProxySnapshot};

use crate::duration::{format_ms, format_us};

const HEADER: [&str; 13] = [
    "LISTENER", "BIND", "MODE", "GEN", "BACKENDS", "ACTIVE", "HELD", "DRAINING", "IN", "OUT", "ERRORS",
    "P50", "P99",
];

/// Renders the snapshot as an aligned text table, one row per listener, followed by one line
/// per generation that is still draining.
pub fn render(snap: &ProxySnapshot) -> String {
    if snap.listeners.is_empty() {
        return "no listeners (add some under proxy.listeners in the config file)\n".to_owned();
    }
    let rows: Vec<[String; 13]> = snap.listeners.iter().map(row).collect();
    let mut widths = HEADER.map(str::len);
    for r in &rows {
        for (w, cell) in widths.iter_mut().zip(r) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let header = HEADER.map(str::to_owned);
    for r in std::iter::once(&header).chain(&rows) {
        let line: Vec<String> = r
            .iter()
            .zip(widths)
            .map(|(cell, w)| format!("{cell}{}", " ".repeat(w - cell.chars().count())))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    for l in &snap.listeners {
        for g in l
            .generations
            .iter()
            .filter(|g| g.phase == GenerationPhase::Draining)
        {
            let backends: Vec<String> = g.backends.iter().map(ToString::to_string).collect();
            out.push_str(&format!(
                "{}: generation {} ({}) draining: {} open, closed in {} if still open\n",
                printable(&l.name),
                g.generation,
                backends.join(", "),
                g.active,
                format_ms(g.drain_remaining_ms.unwrap_or(0))
            ));
        }
    }
    out
}

fn row(l: &ListenerSnapshot) -> [String; 13] {
    let mode = match l.hold_remaining_ms {
        Some(ms) if l.mode == "hold" => format!("hold ({} left)", format_ms(ms)),
        _ => l.mode.clone(),
    };
    let backends = if l.backends.is_empty() {
        "-".to_owned()
    } else {
        l.backends
            .iter()
            .map(|b| match &b.label {
                Some(label) => format!("{} ({})", b.addr, printable(label)),
                None => b.addr.to_string(),
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    let latency = |us: u64| {
        if l.connect.count == 0 {
            "-".to_owned()
        } else {
            format_us(us)
        }
    };
    [
        printable(&l.name),
        l.bind.to_string(),
        mode,
        l.generation.to_string(),
        backends,
        l.counters.active.to_string(),
        l.counters.held.to_string(),
        l.draining.to_string(),
        bytes(l.counters.bytes_in),
        bytes(l.counters.bytes_out),
        (l.counters.dial_errors + l.counters.failed).to_string(),
        latency(l.connect.p50_us),
        latency(l.connect.p99_us),
    ]
}

/// `text` with control characters (newlines, escape sequences, ...) written as Rust escapes
/// (`\n`, `\u{1b}`), so a label cannot add rows or drive the terminal.
pub fn printable(text: &str) -> String {
    if !text.chars().any(char::is_control) {
        return text.to_owned();
    }
    text.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// Bytes in binary units: `512 B`, `1.5 KiB`, `3.2 GiB`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 9 item 16: labels come from the API caller (or container names); a newline
    /// made a fake row and an escape sequence reached the terminal.
    #[test]
    fn control_characters_in_labels_and_names_are_escaped() {
        use dso_proxy::{BackendSnapshot, ListenerSnapshot};
        let l = ListenerSnapshot {
            name: "a\u{1b}[2Jb".into(),
            bind: "127.0.0.1:1".parse().unwrap(),
            mode: "forward".into(),
            hold_remaining_ms: None,
            generation: 1,
            backends: vec![BackendSnapshot {
                addr: "127.0.0.1:2".parse().unwrap(),
                label: Some("green\nfake  row\r".into()),
                counters: Default::default(),
                connect: Default::default(),
            }],
            draining: 0,
            counters: Default::default(),
            connect: Default::default(),
            generations: vec![],
        };
        let out = render(&ProxySnapshot { listeners: vec![l] });
        assert!(!out.chars().any(|c| c.is_control() && c != '\n'), "{out:?}");
        assert_eq!(out.lines().count(), 2, "{out}");
        assert!(out.contains("127.0.0.1:2 (green\\nfake  row\\r)"), "{out}");
        assert!(out.contains("a\\u{1b}[2Jb"), "{out}");
    }

    #[test]
    fn human_bytes() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(1023), "1023 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(5 * 1024 * 1024 * 1024), "5.0 GiB");
    }

    #[test]
    fn row_shows_hold_labels_errors_and_latency() {
        use dso_proxy::{BackendSnapshot, CounterSnapshot, LatencySnapshot, ListenerSnapshot};
        let counters = CounterSnapshot {
            active: 2,
            held: 3,
            bytes_in: 2048,
            bytes_out: 10,
            dial_errors: 4,
            failed: 1,
            ..Default::default()
        };
        let l = ListenerSnapshot {
            name: "pg".into(),
            bind: "127.0.0.1:15432".parse().unwrap(),
            mode: "hold".into(),
            hold_remaining_ms: Some(12_500),
            generation: 3,
            backends: vec![BackendSnapshot {
                addr: "127.0.0.1:5433".parse().unwrap(),
                label: Some("green".into()),
                counters: CounterSnapshot::default(),
                connect: LatencySnapshot::default(),
            }],
            draining: 1,
            counters,
            connect: LatencySnapshot {
                count: 9,
                sum_us: 4000,
                p50_us: 140,
                p99_us: 2500,
                max_us: 3000,
            },
            generations: Vec::new(),
        };
        let text = render(&ProxySnapshot { listeners: vec![l] });
        let row: Vec<&str> = text
            .lines()
            .nth(1)
            .unwrap()
            .split("  ")
            .filter(|c| !c.is_empty())
            .collect();
        let row: Vec<&str> = row.iter().map(|c| c.trim()).collect();
        assert_eq!(
            row,
            [
                "pg",
                "127.0.0.1:15432",
                "hold (12.5s left)",
                "3",
                "127.0.0.1:5433 (green)",
                "2",
                "3",
                "1",
                "2.0 KiB",
                "10 B",
                "5",
                "140µs",
                "2.5ms"
            ]
        );
    }

    #[test]
    fn empty_snapshot_says_so() {
        assert!(render(&ProxySnapshot::default()).contains("no listeners"));
    }
}
