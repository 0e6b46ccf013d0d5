//! `/metrics` encoded from real structures: a proxy with a listener, the secret side over a
//! real local vault (and a provider that cannot be read), delivery's status and histogram.

use std::time::{Duration, Instant};

use dso_proxy::{Backend, ListenerConfig, Proxy, ProxyConfig};
use dso_secrets::SecretValue;
use dso_secrets::local::{LocalVault, NewKey};
use dso_secrets::watcher::Call;
use prometheus_client::encoding::prometheus_text;

use super::*;
use crate::secrets::Secrets;

/// Every family a scrape of an agent without `--docker` has, in order.
const FAMILIES: &[(&str, &str)] = &[
    ("dso_proxy_connections_accepted_total", "counter"),
    ("dso_proxy_backend_connections_accepted_total", "counter"),
    ("dso_proxy_connections_active", "gauge"),
    ("dso_proxy_backend_connections_active", "gauge"),
    ("dso_proxy_connections_held", "gauge"),
    ("dso_proxy_dial_errors_total", "counter"),
    ("dso_proxy_backend_dial_errors_total", "counter"),
    ("dso_proxy_dial_retries_total", "counter"),
    ("dso_proxy_backend_dial_retries_total", "counter"),
    ("dso_proxy_connections_failed_total", "counter"),
    ("dso_proxy_backend_connections_failed_total", "counter"),
    ("dso_proxy_connections_forced_total", "counter"),
    ("dso_proxy_backend_connections_forced_total", "counter"),
    ("dso_proxy_hold_timeouts_total", "counter"),
    ("dso_proxy_idle_timeouts_total", "counter"),
    ("dso_proxy_backend_idle_timeouts_total", "counter"),
    ("dso_proxy_bytes_total", "counter"),
    ("dso_proxy_connections_draining", "gauge"),
    ("dso_proxy_generation", "gauge"),
    ("dso_proxy_paused", "gauge"),
    ("dso_secrets_changes_total", "counter"),
    ("dso_secrets_provider_outages_total", "counter"),
    ("dso_secrets_unusable_total", "counter"),
    ("dso_secrets_provider_up", "gauge"),
    ("dso_secrets_provider_consecutive_failures", "gauge"),
    ("dso_secrets_last_success_timestamp_seconds", "gauge"),
    ("dso_secrets_provider_calls_total", "counter"),
    ("dso_secrets_provider_errors_total", "counter"),
    ("dso_secrets_version_changes_total", "counter"),
    ("dso_proxy_connect_seconds", "summary"),
    ("dso_proxy_backend_connect_seconds", "summary"),
];

const VALUE_1: &[u8] = b"metrics-test-value-1-Kq3";
const VALUE_2: &[u8] = b"metrics-test-value-2-Kq3";

fn has(text: &str, line: &str) {
    assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
}

/// The `# TYPE` lines, in order.
fn types(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .map(|l| {
            let (n, t) = l.split_once(' ').unwrap();
            (n.to_owned(), t.to_owned())
        })
        .collect()
}

fn state(proxy: Proxy, secrets: Option<Arc<Secrets>>) -> State {
    State {
        proxy,
        started: Instant::now(),
        docker: crate::docker::DockerSlot::off(),
        secrets,
        events: crate::events::Bus::new(),
    }
}

/// Polls `ok` on the secret side's status for up to 10 s.
async fn until(secrets: &Secrets, ok: impl Fn(&crate::secrets::SecretsStatus) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ok(&secrets.status().await) {
        assert!(Instant::now() < deadline, "{:?}", secrets.status().await);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_scrape_encodes_the_live_proxy_and_secret_side() {
    let dir = tempfile::tempdir().unwrap();
    let (vault_file, key_file) = (dir.path().join("vault.enc"), dir.path().join("master.key"));
    let vault = LocalVault::create(&vault_file, NewKey::KeyFile(key_file.clone())).unwrap();
    vault.set("app/pw", &SecretValue::from_slice(VALUE_1)).unwrap();
    let yaml = format!(
        "version: v1.0.0\nproviders:\n  local:\n    type: local\n    vault_file: {v}\n    master_key_file: {k}\n\
         \x20 gone:\n    type: local\n    vault_file: {d}/missing.enc\n    master_key_file: {k}\n\
         agent:\n  watch:\n    polling_interval: 10m\n    debounce: 0s\n\
         secrets:\n  - name: app\n    provider: local\n    mappings:\n      PW: app/pw\n\
         \x20 - name: lost\n    provider: gone\n    mappings:\n      X: app/x\n",
        v = vault_file.display(),
        k = key_file.display(),
        d = dir.path().display(),
    );
    let cfg = crate::config::parse(&yaml, |_| None).unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let secrets = Secrets::start(
        &cfg.secrets,
        &dir.path().join("state"),
        stop.clone(),
        crate::events::Bus::new(),
    )
    .unwrap()
    .unwrap();
    until(&secrets, |s| s.secrets[0].seen.snapshots == 1).await;
    vault.set("app/pw", &SecretValue::from_slice(VALUE_2)).unwrap();
    assert_eq!(secrets.notify_local(&vault_file), ["local"]);
    until(&secrets, |s| s.secrets[0].seen.snapshots == 2).await;

    let backend = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let proxy = Proxy::new(ProxyConfig::default());
    proxy
        .add_listener(ListenerConfig::new(
            "shop/web:8080",
            "127.0.0.1:0".parse().unwrap(),
            vec![Backend::labeled(backend, "web-1 (abc)")],
        ))
        .unwrap();
    let st = state(proxy, Some(Arc::clone(&secrets)));
    let text = render(&st);

    // Every family, once, in order, with its type; no OpenMetrics `# EOF`.
    let want: Vec<(String, String)> = FAMILIES
        .iter()
        .map(|(n, t)| (n.to_string(), t.to_string()))
        .collect();
    assert_eq!(types(&text), want, "{text}");
    assert!(!text.contains("# EOF"));
    has(
        &text,
        "# HELP dso_secrets_provider_calls_total Calls to the provider: version (metadata only) or fetch (a value), ok or error.",
    );
    // The proxy, from its snapshot.
    has(&text, "dso_proxy_generation{listener=\"shop/web:8080\"} 1");
    has(
        &text,
        "dso_proxy_connections_accepted_total{listener=\"shop/web:8080\"} 0",
    );
    has(
        &text,
        &format!(
            "dso_proxy_backend_connections_active{{listener=\"shop/web:8080\",backend=\"{backend}\",label=\"web-1 (abc)\"}} 0"
        ),
    );
    has(
        &text,
        "dso_proxy_bytes_total{listener=\"shop/web:8080\",direction=\"out\"} 0",
    );
    has(
        &text,
        "dso_proxy_connect_seconds{listener=\"shop/web:8080\",quantile=\"0.99\"} NaN",
    );
    has(
        &text,
        "dso_proxy_connect_seconds_count{listener=\"shop/web:8080\"} 0",
    );
    // The secret side: a first snapshot and one change on `local`, read once each.
    let stats = secrets.watcher().provider_stats();
    let (local, gone) = (&stats["local"], &stats["gone"]);
    assert_eq!(local.calls_ok(Call::Fetch), 2);
    has(&text, "dso_secrets_changes_total{provider=\"local\"} 2");
    has(&text, "dso_secrets_version_changes_total{provider=\"local\"} 1");
    has(
        &text,
        "dso_secrets_provider_calls_total{provider=\"local\",call=\"fetch\",result=\"ok\"} 2",
    );
    has(
        &text,
        &format!(
            "dso_secrets_provider_calls_total{{provider=\"local\",call=\"version\",result=\"ok\"}} {}",
            local.calls_ok(Call::Version)
        ),
    );
    has(&text, "dso_secrets_provider_up{provider=\"local\"} 1");
    let ms = local.last_success_unix_ms().unwrap();
    let shown: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("dso_secrets_last_success_timestamp_seconds{provider=\"local\"} "))
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(shown, ms as f64 / 1000.0);
    // `gone` cannot be read: its failed polls are counted on it, by kind.
    let failed = gone.calls_failed(Call::Version);
    assert!(failed >= 1);
    has(
        &text,
        &format!(
            "dso_secrets_provider_calls_total{{provider=\"gone\",call=\"version\",result=\"error\"}} {failed}"
        ),
    );
    let kinds: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("dso_secrets_provider_errors_total{provider=\"gone\",call=\"version\""))
        .collect();
    // A missing vault file is a settings error, not an outage.
    assert_eq!(
        kinds,
        [format!(
            "dso_secrets_provider_errors_total{{provider=\"gone\",call=\"version\",kind=\"config\"}} {failed}"
        )],
        "{text}"
    );
    assert!(
        !text.contains("dso_secrets_provider_errors_total{provider=\"local\""),
        "no error on local: {text}"
    );
    has(
        &text,
        "dso_secrets_provider_calls_total{provider=\"gone\",call=\"fetch\",result=\"ok\"} 0",
    );
    for v in [VALUE_1, VALUE_2] {
        assert!(!text.contains(std::str::from_utf8(v).unwrap()));
    }
    stop.cancel();
}

#[test]
fn an_empty_proxy_renders_only_families() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _guard = rt.enter();
    let text = render(&state(Proxy::new(ProxyConfig::default()), None));
    assert!(text.lines().all(|l| l.starts_with('#')), "{text}");
    let names: Vec<String> = types(&text).into_iter().map(|(n, _)| n).collect();
    let proxy: Vec<&str> = FAMILIES
        .iter()
        .map(|(n, _)| *n)
        .filter(|n| n.starts_with("dso_proxy_"))
        .collect();
    assert_eq!(names, proxy);
    assert!(text.contains("# TYPE dso_proxy_connect_seconds summary"));
}

#[test]
fn label_values_are_escaped() {
    assert_eq!(escape(r#"a"b\c"#), r#"a\"b\\c"#);
    assert_eq!(render_labels(&[("label", "x\ny")]), "label=\"x\\ny\"");
}

/// Encodes one family function through a registry, as a scrape does.
fn encode_with(f: impl Fn(&mut DescriptorEncoder) -> fmt::Result + Send + Sync + 'static) -> String {
    struct One<F>(F);
    impl<F> fmt::Debug for One<F> {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("One")
        }
    }
    impl<F: Fn(&mut DescriptorEncoder) -> fmt::Result + Send + Sync + 'static> Collector for One<F> {
        fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
            (self.0)(&mut enc)
        }
    }
    let mut registry = Registry::default();
    registry.register_collector(Box::new(One(f)));
    let mut out = String::new();
    prometheus_text::encode(&mut out, &registry).unwrap();
    out
}

#[test]
fn delivery_shows_each_service_by_result_with_escaped_labels_and_the_latency_histogram() {
    let s = ServiceDelivery {
        service: "shop/web\"x".into(),
        delivered: 3,
        failed: 1,
        failed_versions: std::collections::BTreeMap::from([("app/pw".to_owned(), "4".to_owned())]),
        last_attempt_unix_ms: Some(1_500),
        ..Default::default()
    };
    let latency = Histogram::new(crate::delivery::LATENCY_BUCKETS);
    latency.observe(1.25);
    latency.observe(40.0);
    let text = encode_with(move |enc| delivery(enc, std::slice::from_ref(&s), &latency));
    has(
        &text,
        "dso_delivery_rotations_total{service=\"shop/web\\\"x\",result=\"ok\"} 3",
    );
    has(
        &text,
        "dso_delivery_rotations_total{service=\"shop/web\\\"x\",result=\"failed\"} 1",
    );
    has(&text, "dso_delivery_failed_versions{service=\"shop/web\\\"x\"} 1");
    has(
        &text,
        "dso_delivery_last_attempt_timestamp_seconds{service=\"shop/web\\\"x\"} 1.5",
    );
    has(&text, "# TYPE dso_delivery_latency_seconds histogram");
    has(&text, "dso_delivery_latency_seconds_bucket{le=\"1\"} 0");
    has(&text, "dso_delivery_latency_seconds_bucket{le=\"2.5\"} 1");
    has(&text, "dso_delivery_latency_seconds_bucket{le=\"30\"} 1");
    has(&text, "dso_delivery_latency_seconds_bucket{le=\"60\"} 2");
    has(&text, "dso_delivery_latency_seconds_bucket{le=\"+Inf\"} 2");
    has(&text, "dso_delivery_latency_seconds_sum 41.25");
    has(&text, "dso_delivery_latency_seconds_count 2");
    assert_eq!(text.matches("# TYPE").count(), 4, "{text}");
}

#[test]
fn rotations_show_every_strategy_and_result() {
    let text = encode_with(|enc| rotations(enc, &dso_rotator::counts::RotationCounts::default()));
    has(&text, "# TYPE dso_rotations_total counter");
    has(
        &text,
        "dso_rotations_total{strategy=\"rolling\",result=\"done\"} 0",
    );
    has(
        &text,
        "dso_rotations_total{strategy=\"auto\",result=\"failed\"} 0",
    );
    assert_eq!(text.lines().filter(|l| !l.starts_with('#')).count(), 15, "{text}");
}
