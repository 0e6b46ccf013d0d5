//! `GET /metrics`: the proxy snapshot in Prometheus text format (version 0.0.4).
//!
//! Every value comes from [`dso_proxy::Proxy::snapshot`]; nothing is kept or derived here
//! except the unit change of latencies (µs to seconds).

use std::fmt::Write;

use super::State;
use dso_proxy::{CounterSnapshot, LatencySnapshot, ProxySnapshot};

/// One counter of [`CounterSnapshot`] as a metric family.
struct Field {
    /// Name after `dso_proxy_` (and `dso_proxy_backend_`).
    name: &'static str,
    help: &'static str,
    /// Prometheus type.
    kind: &'static str,
    get: fn(&CounterSnapshot) -> u64,
    /// Whether the counter means anything per backend (held connections have no backend).
    per_backend: bool,
}

/// Counter fields exported per listener and, where meaningful, per backend.
const FIELDS: &[Field] = &[
    Field {
        name: "connections_accepted_total",
        help: "Connections accepted from clients.",
        kind: "counter",
        get: |c| c.accepted,
        per_backend: true,
    },
    Field {
        name: "connections_active",
        help: "Connections currently forwarding.",
        kind: "gauge",
        get: |c| c.active,
        per_backend: true,
    },
    Field {
        name: "connections_held",
        help: "Connections accepted and waiting for a route (listener paused).",
        kind: "gauge",
        get: |c| c.held,
        per_backend: false,
    },
    Field {
        name: "dial_errors_total",
        help: "Backend dials that failed (refused, unreachable, timed out).",
        kind: "counter",
        get: |c| c.dial_errors,
        per_backend: true,
    },
    Field {
        name: "dial_retries_total",
        help: "Dials retried before the first byte was forwarded.",
        kind: "counter",
        get: |c| c.retries,
        per_backend: true,
    },
    Field {
        name: "connections_failed_total",
        help: "Client connections closed because no backend could be dialed.",
        kind: "counter",
        get: |c| c.failed,
        per_backend: true,
    },
    Field {
        name: "connections_forced_total",
        help: "Connections closed by the proxy at a drain deadline or forced shutdown.",
        kind: "counter",
        get: |c| c.forced_closes,
        per_backend: true,
    },
    Field {
        name: "hold_timeouts_total",
        help: "Held connections closed because the hold passed its maximum.",
        kind: "counter",
        get: |c| c.hold_timeouts,
        per_backend: false,
    },
    Field {
        name: "idle_timeouts_total",
        help: "Connections closed by the idle timeout.",
        kind: "counter",
        get: |c| c.idle_timeouts,
        per_backend: true,
    },
];

/// The text of `GET /metrics`: the proxy's families, then the secret side's and delivery's.
pub async fn render(state: &State) -> String {
    let mut text = render_proxy(&state.proxy.snapshot());
    if let Some(secrets) = &state.secrets {
        text.push_str(&secrets.render_metrics().await);
        if let Some(d) = secrets.deliverer() {
            text.push_str(&d.render_metrics());
        }
    }
    text
}

/// Renders a snapshot as Prometheus text.
pub fn render_proxy(snap: &ProxySnapshot) -> String {
    let mut out = String::new();
    for f in FIELDS {
        let (suffix, help, kind, get) = (f.name, f.help, f.kind, f.get);
        family(&mut out, &format!("dso_proxy_{suffix}"), help, kind);
        for l in &snap.listeners {
            sample(
                &mut out,
                &format!("dso_proxy_{suffix}"),
                &[("listener", &l.name)],
                get(&l.counters),
            );
        }
        if !f.per_backend {
            continue;
        }
        family(&mut out, &format!("dso_proxy_backend_{suffix}"), help, kind);
        for l in &snap.listeners {
            for b in &l.backends {
                let addr = b.addr.to_string();
                let labels = [
                    ("listener", l.name.as_str()),
                    ("backend", &addr),
                    ("label", b.label.as_deref().unwrap_or("")),
                ];
                sample(
                    &mut out,
                    &format!("dso_proxy_backend_{suffix}"),
                    &labels,
                    get(&b.counters),
                );
            }
        }
    }
    family(
        &mut out,
        "dso_proxy_bytes_total",
        "Bytes forwarded: in is client to backend, out is backend to client.",
        "counter",
    );
    for l in &snap.listeners {
        sample(
            &mut out,
            "dso_proxy_bytes_total",
            &[("listener", &l.name), ("direction", "in")],
            l.counters.bytes_in,
        );
        sample(
            &mut out,
            "dso_proxy_bytes_total",
            &[("listener", &l.name), ("direction", "out")],
            l.counters.bytes_out,
        );
    }
    family(
        &mut out,
        "dso_proxy_connections_draining",
        "Connections still open in replaced generations.",
        "gauge",
    );
    for l in &snap.listeners {
        sample(
            &mut out,
            "dso_proxy_connections_draining",
            &[("listener", &l.name)],
            l.draining,
        );
    }
    family(
        &mut out,
        "dso_proxy_generation",
        "Current route generation; grows by one at each swap.",
        "gauge",
    );
    for l in &snap.listeners {
        sample(
            &mut out,
            "dso_proxy_generation",
            &[("listener", &l.name)],
            l.generation,
        );
    }
    family(
        &mut out,
        "dso_proxy_paused",
        "1 while the listener holds new connections, else 0.",
        "gauge",
    );
    for l in &snap.listeners {
        sample(
            &mut out,
            "dso_proxy_paused",
            &[("listener", &l.name)],
            u64::from(l.mode == "hold"),
        );
    }
    let help = "Connect latency from routing to the backend accepting, retries included.";
    family(&mut out, "dso_proxy_connect_seconds", help, "summary");
    for l in &snap.listeners {
        latency(
            &mut out,
            "dso_proxy_connect_seconds",
            &[("listener", &l.name)],
            &l.connect,
        );
    }
    family(&mut out, "dso_proxy_backend_connect_seconds", help, "summary");
    for l in &snap.listeners {
        for b in &l.backends {
            let addr = b.addr.to_string();
            latency(
                &mut out,
                "dso_proxy_backend_connect_seconds",
                &[
                    ("listener", &l.name),
                    ("backend", &addr),
                    ("label", b.label.as_deref().unwrap_or("")),
                ],
                &b.connect,
            );
        }
    }
    out
}

fn family(out: &mut String, name: &str, help: &str, kind: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

fn sample(out: &mut String, name: &str, labels: &[(&str, &str)], value: u64) {
    let _ = writeln!(out, "{name}{{{}}} {value}", render_labels(labels));
}

/// Quantiles 0.5, 0.99 and 1 (the maximum; NaN while nothing was measured), the exact sum
/// and the count.
fn latency(out: &mut String, name: &str, labels: &[(&str, &str)], l: &LatencySnapshot) {
    let base = render_labels(labels);
    for (q, us) in [("0.5", l.p50_us), ("0.99", l.p99_us), ("1", l.max_us)] {
        // With nothing measured a quantile is undefined: Prometheus' convention is NaN.
        let v = if l.count == 0 { f64::NAN } else { us as f64 / 1e6 };
        let _ = writeln!(out, "{name}{{{base},quantile=\"{q}\"}} {v}");
    }
    let _ = writeln!(out, "{name}_sum{{{base}}} {}", l.sum_us as f64 / 1e6);
    let _ = writeln!(out, "{name}_count{{{base}}} {}", l.count);
}

fn render_labels(labels: &[(&str, &str)]) -> String {
    labels
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
        .collect::<Vec<_>>()
        .join(",")
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape(r#"a"b\c"#), r#"a\"b\\c"#);
        assert_eq!(render_labels(&[("label", "x\ny")]), "label=\"x\\ny\"");
    }

    #[test]
    fn empty_proxy_renders_only_families() {
        let text = render_proxy(&ProxySnapshot::default());
        assert!(text.lines().all(|l| l.starts_with('#')), "{text}");
        assert!(text.contains("# TYPE dso_proxy_connect_seconds summary"));
    }
}
