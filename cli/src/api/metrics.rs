//! `GET /metrics`: the agent's figures in the Prometheus text format (version 0.0.4).
//!
//! Each scrape builds a [`Registry`] of collectors over the live structures (the proxy's
//! snapshot, the secret watcher's per-provider counters, delivery's per-service status, the
//! rotator's rotation counts) and has prometheus-client's encoder write it: nothing is kept
//! or derived here except the unit change of latencies (µs to seconds).
//!
//! Kept hand-written: the two summary families of the proxy's connect latency. The
//! quantiles come from the proxy's HDR histogram, and prometheus-client has no summary type
//! (its `MetricType` lists it as not supported), so their lines are appended after the
//! encoder's output, in the same format.

use std::fmt::{self, Write};
use std::sync::Arc;

use dso_proxy::{CounterSnapshot, LatencySnapshot, ProxySnapshot};
use dso_rotator::counts::{RotationCounts, RotationResult, STRATEGIES};
use dso_secrets::watcher::{Call, ErrorKind};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeGaugeValue, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use super::State;
use crate::delivery::ServiceDelivery;
use crate::secrets::ProviderCounters;

/// The `Content-Type` of what [`render`] returns.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// One counter of [`CounterSnapshot`] as a metric family.
struct Field {
    /// Name after `dso_proxy_` (and `dso_proxy_backend_`).
    name: &'static str,
    help: &'static str,
    /// Prometheus type.
    kind: MetricType,
    get: fn(&CounterSnapshot) -> u64,
    /// Whether the counter means anything per backend (held connections have no backend).
    per_backend: bool,
}

/// Counter fields exported per listener and, where meaningful, per backend.
const FIELDS: &[Field] = &[
    Field {
        name: "connections_accepted_total",
        help: "Connections accepted from clients.",
        kind: MetricType::Counter,
        get: |c| c.accepted,
        per_backend: true,
    },
    Field {
        name: "connections_active",
        help: "Connections currently forwarding.",
        kind: MetricType::Gauge,
        get: |c| c.active,
        per_backend: true,
    },
    Field {
        name: "connections_held",
        help: "Connections accepted and waiting for a route (listener paused).",
        kind: MetricType::Gauge,
        get: |c| c.held,
        per_backend: false,
    },
    Field {
        name: "dial_errors_total",
        help: "Backend dials that failed (refused, unreachable, timed out).",
        kind: MetricType::Counter,
        get: |c| c.dial_errors,
        per_backend: true,
    },
    Field {
        name: "dial_retries_total",
        help: "Dials retried before the first byte was forwarded.",
        kind: MetricType::Counter,
        get: |c| c.retries,
        per_backend: true,
    },
    Field {
        name: "connections_failed_total",
        help: "Client connections closed because no backend could be dialed.",
        kind: MetricType::Counter,
        get: |c| c.failed,
        per_backend: true,
    },
    Field {
        name: "connections_forced_total",
        help: "Connections closed by the proxy at a drain deadline or forced shutdown.",
        kind: MetricType::Counter,
        get: |c| c.forced_closes,
        per_backend: true,
    },
    Field {
        name: "hold_timeouts_total",
        help: "Held connections closed because the hold passed its maximum.",
        kind: MetricType::Counter,
        get: |c| c.hold_timeouts,
        per_backend: false,
    },
    Field {
        name: "idle_timeouts_total",
        help: "Connections closed by the idle timeout.",
        kind: MetricType::Counter,
        get: |c| c.idle_timeouts,
        per_backend: true,
    },
];

/// The whole `/metrics` text of the agent now, in the Prometheus text format 0.0.4
/// ([`CONTENT_TYPE`]).
pub fn render(state: &State) -> String {
    let proxy = Arc::new(state.proxy.snapshot());
    let mut registry = Registry::default();
    registry.register_collector(Box::new(ProxyCollector(Arc::clone(&proxy))));
    if let Some(secrets) = &state.secrets {
        registry.register_collector(Box::new(SecretsCollector(Arc::clone(secrets))));
        if let Some(d) = secrets.deliverer() {
            registry.register_collector(Box::new(DeliveryCollector(Arc::clone(d))));
        }
    }
    if let Some(docker) = &state.docker.ready() {
        registry.register_collector(Box::new(RotationsCollector(Arc::clone(docker))));
    }
    if let Some(r) = crate::reload::get() {
        registry.register_collector(Box::new(crate::reload::ReloadCollector(r)));
    }
    if let Some(c) = crate::swarm::collector() {
        registry.register_collector(c);
    }
    let mut out = String::new();
    prometheus_client::encoding::prometheus_text::encode(&mut out, &registry)
        // Writing to a String cannot fail; a value can only if a u64 gauge passes i64::MAX,
        // which no gauge here (connections, generations, counts of versions) comes near.
        .expect("metrics encode");
    summaries(&mut out, &proxy);
    out
}

/// A counter family: `rows` of labels and value. `name` is the exported name, `_total`
/// included (the encoder adds the suffix to a counter's family name).
fn counters<L: EncodeLabelSet>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: impl IntoIterator<Item = (L, u64)>,
) -> fmt::Result {
    let family = name.strip_suffix("_total").unwrap_or(name);
    let mut m = enc.encode_descriptor(family, help, None, MetricType::Counter)?;
    for (labels, v) in rows {
        ConstCounter::new(v).encode(m.encode_family(&labels)?)?;
    }
    Ok(())
}

/// A gauge family: `rows` of labels and value.
fn gauges<L: EncodeLabelSet, V: EncodeGaugeValue>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: impl IntoIterator<Item = (L, V)>,
) -> fmt::Result {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, v) in rows {
        ConstGauge::new(v).encode(m.encode_family(&labels)?)?;
    }
    Ok(())
}

/// The proxy's counters and gauges, from one snapshot taken at the scrape.
#[derive(Debug)]
struct ProxyCollector(Arc<ProxySnapshot>);

impl Collector for ProxyCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        let snap = &self.0;
        for f in FIELDS {
            let rows = || {
                snap.listeners
                    .iter()
                    .map(|l| ([("listener", l.name.as_str())], (f.get)(&l.counters)))
            };
            let name = format!("dso_proxy_{}", f.name);
            match f.kind {
                MetricType::Counter => counters(&mut enc, &name, f.help, rows())?,
                _ => gauges(&mut enc, &name, f.help, rows())?,
            }
            if !f.per_backend {
                continue;
            }
            let addrs: Vec<Vec<String>> = snap
                .listeners
                .iter()
                .map(|l| l.backends.iter().map(|b| b.addr.to_string()).collect())
                .collect();
            let rows = || {
                snap.listeners.iter().zip(&addrs).flat_map(|(l, addrs)| {
                    l.backends.iter().zip(addrs).map(|(b, addr)| {
                        let labels = [
                            ("listener", l.name.as_str()),
                            ("backend", addr.as_str()),
                            ("label", b.label.as_deref().unwrap_or("")),
                        ];
                        (labels, (f.get)(&b.counters))
                    })
                })
            };
            let name = format!("dso_proxy_backend_{}", f.name);
            match f.kind {
                MetricType::Counter => counters(&mut enc, &name, f.help, rows())?,
                _ => gauges(&mut enc, &name, f.help, rows())?,
            }
        }
        counters(
            &mut enc,
            "dso_proxy_bytes_total",
            "Bytes forwarded: in is client to backend, out is backend to client.",
            snap.listeners.iter().flat_map(|l| {
                [
                    (
                        [("listener", l.name.as_str()), ("direction", "in")],
                        l.counters.bytes_in,
                    ),
                    (
                        [("listener", l.name.as_str()), ("direction", "out")],
                        l.counters.bytes_out,
                    ),
                ]
            }),
        )?;
        let per_listener = |get: fn(&dso_proxy::ListenerSnapshot) -> u64| {
            snap.listeners
                .iter()
                .map(move |l| ([("listener", l.name.as_str())], get(l)))
        };
        gauges(
            &mut enc,
            "dso_proxy_connections_draining",
            "Connections still open in replaced generations.",
            per_listener(|l| l.draining),
        )?;
        gauges(
            &mut enc,
            "dso_proxy_generation",
            "Current route generation; grows by one at each swap.",
            per_listener(|l| l.generation),
        )?;
        gauges(
            &mut enc,
            "dso_proxy_paused",
            "1 while the listener holds new connections, else 0.",
            per_listener(|l| u64::from(l.mode == "hold")),
        )
    }
}

/// Rotations the rotator ran, by strategy and result (`--docker`).
#[derive(Debug)]
struct RotationsCollector(Arc<crate::docker::Docker>);

impl Collector for RotationsCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        rotations(&mut enc, self.0.rotator.rotation_counts())
    }
}

/// `dso_rotations_total`: every strategy and result, zeros included.
fn rotations(enc: &mut DescriptorEncoder, n: &RotationCounts) -> fmt::Result {
    let names: Vec<String> = STRATEGIES.iter().map(ToString::to_string).collect();
    counters(
        enc,
        "dso_rotations_total",
        "Rotations run by the agent's rotator (dso rotate, secret deliveries), by the strategy used and how they ended (done, refused, failed).",
        STRATEGIES.iter().zip(&names).flat_map(|(s, name)| {
            RotationResult::ALL.iter().map(move |r| {
                (
                    [("strategy", name.as_str()), ("result", r.as_str())],
                    n.get(*s, *r),
                )
            })
        }),
    )
}

/// The secret side: the counters kept from the watcher's events, and the watcher's own
/// per-provider counters and health.
#[derive(Debug)]
struct SecretsCollector(Arc<crate::secrets::Secrets>);

impl Collector for SecretsCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        let events = self.0.event_counters();
        let stats = self.0.watcher().provider_stats();
        let per = |f: fn(&ProviderCounters) -> u64| {
            events
                .iter()
                .map(move |(p, c)| ([("provider", p.as_str())], f(c)))
        };
        let each = || stats.iter().map(|(p, s)| (p.as_str(), s.as_ref()));
        counters(
            &mut enc,
            "dso_secrets_changes_total",
            "Snapshots taken (a change, a first delivery, or a change made while the agent was down) whose references use this provider.",
            per(|c| c.changes),
        )?;
        counters(
            &mut enc,
            "dso_secrets_provider_outages_total",
            "Times calls to this provider started failing (the last good values stayed).",
            each().map(|(p, s)| ([("provider", p)], s.outages())),
        )?;
        counters(
            &mut enc,
            "dso_secrets_unusable_total",
            "Values read from this provider that could not be used (empty, JSON key missing, not found, forbidden).",
            per(|c| c.unusable),
        )?;
        gauges(
            &mut enc,
            "dso_secrets_provider_up",
            "1 when the provider's last call succeeded, 0 when its calls fail.",
            each().map(|(p, s)| ([("provider", p)], i64::from(s.up()))),
        )?;
        gauges(
            &mut enc,
            "dso_secrets_provider_consecutive_failures",
            "Failed calls to the provider since its last success.",
            each().map(|(p, s)| ([("provider", p)], s.consecutive_failures())),
        )?;
        gauges(
            &mut enc,
            "dso_secrets_last_success_timestamp_seconds",
            "Unix time of the provider's last successful call (absent before the first).",
            each().filter_map(|(p, s)| Some(([("provider", p)], s.last_success_unix_ms()? as f64 / 1000.0))),
        )?;
        counters(
            &mut enc,
            "dso_secrets_provider_calls_total",
            "Calls to the provider: version (metadata only) or fetch (a value), ok or error.",
            each().flat_map(|(p, s)| {
                Call::ALL.into_iter().flat_map(move |c| {
                    [
                        (
                            [("provider", p), ("call", c.as_str()), ("result", "ok")],
                            s.calls_ok(c),
                        ),
                        (
                            [("provider", p), ("call", c.as_str()), ("result", "error")],
                            s.calls_failed(c),
                        ),
                    ]
                })
            }),
        )?;
        counters(
            &mut enc,
            "dso_secrets_provider_errors_total",
            "Failed calls to the provider by call and kind of error (a label set appears at its first error).",
            each().flat_map(|(p, s)| {
                Call::ALL.into_iter().flat_map(move |c| {
                    ErrorKind::ALL
                        .into_iter()
                        .map(move |k| {
                            (
                                [("provider", p), ("call", c.as_str()), ("kind", k.as_str())],
                                s.errors(c, k),
                            )
                        })
                        .filter(|(_, n)| *n > 0)
                })
            }),
        )?;
        counters(
            &mut enc,
            "dso_secrets_version_changes_total",
            "Polls that saw an object's version differ from the one seen before (the first version seen after start is not a change).",
            each().map(|(p, s)| ([("provider", p)], s.version_changes())),
        )
    }
}

/// Delivery: per-service status and the latency histogram.
#[derive(Debug)]
struct DeliveryCollector(Arc<crate::delivery::Deliverer>);

impl Collector for DeliveryCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        delivery(&mut enc, &self.0.status(), self.0.latency())
    }
}

/// The delivery families of a status and a latency histogram.
fn delivery(enc: &mut DescriptorEncoder, status: &[ServiceDelivery], latency: &Histogram) -> fmt::Result {
    let svc = |s: &ServiceDelivery| s.service.clone();
    counters(
        enc,
        "dso_delivery_rotations_total",
        "Secret deliveries per service by result (ok: the rotation or in-place update succeeded; failed: it failed and the container kept its values).",
        status.iter().flat_map(|s| {
            [
                ([("service", svc(s)), ("result", "ok".to_owned())], s.delivered),
                ([("service", svc(s)), ("result", "failed".to_owned())], s.failed),
            ]
        }),
    )?;
    gauges(
        enc,
        "dso_delivery_failed_versions",
        "References whose current version failed to roll out and is not retried until it changes or `dso rotate SERVICE --force`.",
        status
            .iter()
            .map(|s| ([("service", s.service.as_str())], s.failed_versions.len() as u64)),
    )?;
    gauges(
        enc,
        "dso_delivery_last_attempt_timestamp_seconds",
        "Unix time of the service's last delivery attempt.",
        status.iter().filter_map(|s| {
            Some((
                [("service", s.service.as_str())],
                s.last_attempt_unix_ms? as f64 / 1000.0,
            ))
        }),
    )?;
    let m = enc.encode_descriptor(
        "dso_delivery_latency_seconds",
        "Seconds from the watcher having a service's new versions (the poll that saw the newest, or the start of watching the service) to the end of the rotation that delivered them; successful deliveries only.",
        None,
        latency.metric_type(),
    )?;
    latency.encode(m)
}

/// The connect latency summaries, per listener and per backend (hand-written: see the
/// module's doc).
fn summaries(out: &mut String, snap: &ProxySnapshot) {
    let help = "Connect latency from routing to the backend accepting, retries included.";
    family(out, "dso_proxy_connect_seconds", help, "summary");
    for l in &snap.listeners {
        latency(
            out,
            "dso_proxy_connect_seconds",
            &[("listener", &l.name)],
            &l.connect,
        );
    }
    family(out, "dso_proxy_backend_connect_seconds", help, "summary");
    for l in &snap.listeners {
        for b in &l.backends {
            let addr = b.addr.to_string();
            latency(
                out,
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
}

fn family(out: &mut String, name: &str, help: &str, kind: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
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
mod tests;
