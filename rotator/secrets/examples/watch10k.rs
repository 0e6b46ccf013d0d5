//! Measures the watcher with 10,000 references against a fake in-process provider:
//! provider calls per minute under the rate limit and the process's resident memory.
//!
//! Runs on tokio's paused clock (the fake provider answers at once, so the runtime jumps
//! from timer to timer): simulated minutes take real seconds, and the call counts are
//! exactly what the watcher's scheduling and rate limit produce. Memory is the real
//! resident set of this process (`VmRSS`/`VmHWM` from `/proc/self/status`).
//!
//! `cargo run --release -p dso-secrets --example watch10k -- [REFS] [MINUTES] [RATE_PER_SEC]`
//! (defaults 10000, 20, 50: the default `Limits::rate_per_sec`).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use dso_secrets::provider::{CheckReport, Provider, Version};
use dso_secrets::spec::{Limits, ProviderKind};
use dso_secrets::watcher::{Event, WatchSettings, Watched, Watcher};
use dso_secrets::{Reference, Result, SecretValue};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Every object at version `generation`; changing one bumps only its own version.
struct Fake {
    versions: AtomicU64,
    fetches: AtomicU64,
    bumped: std::sync::Mutex<HashMap<String, u64>>,
}

#[async_trait]
impl Provider for Fake {
    fn name(&self) -> &str {
        "fake"
    }
    fn kind(&self) -> ProviderKind {
        ProviderKind::Aws
    }
    async fn version(&self, r: &Reference) -> Result<Version> {
        self.versions.fetch_add(1, Ordering::Relaxed);
        let v = self.bumped.lock().unwrap().get(&r.object).copied().unwrap_or(1);
        Ok(Version::new(format!("v{v}")))
    }
    async fn fetch(&self, r: &Reference, version: &Version) -> Result<SecretValue> {
        self.fetches.fetch_add(1, Ordering::Relaxed);
        // A 64-byte JSON value, different per object and version.
        let text = format!(
            "{{\"password\":\"{:0>40}\"}}",
            format!("{}-{}", r.object, version)
        );
        Ok(SecretValue::new(text.into_bytes()))
    }
    async fn check(&self) -> Result<CheckReport> {
        Ok(CheckReport {
            provider: "fake".into(),
            detail: "fake".into(),
        })
    }
}

fn rss_kib() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let refs: usize = args.first().and_then(|a| a.parse().ok()).unwrap_or(10_000);
    let minutes: u64 = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(20);
    let rate: f64 = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(50.0);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap();
    rt.block_on(run(refs, minutes, rate));
}

async fn run(refs: usize, minutes: u64, rate: f64) {
    let (rss0, _) = rss_kib();
    let fake = Arc::new(Fake {
        versions: AtomicU64::new(0),
        fetches: AtomicU64::new(0),
        bumped: std::sync::Mutex::new(HashMap::new()),
    });
    let mut providers: HashMap<String, Arc<dyn Provider>> = HashMap::new();
    providers.insert("fake".into(), Arc::clone(&fake) as Arc<dyn Provider>);
    // Four mappings per consumer, every reference its own object.
    let items: Vec<Watched> = (0..refs.div_ceil(4))
        .map(|c| Watched {
            consumer: format!("svc-{c}"),
            mappings: (0..4)
                .map(|m| c * 4 + m)
                .filter(|i| *i < refs)
                .map(|i| {
                    let r = Reference::parse(ProviderKind::Aws, "fake", &format!("app/secret-{i}#password"))
                        .unwrap();
                    (format!("KEY_{i}"), r)
                })
                .collect(),
        })
        .collect();
    let consumers = items.len();
    let mut limits = HashMap::new();
    limits.insert(
        "fake".to_string(),
        Limits {
            rate_per_sec: rate,
            ..Limits::default()
        },
    );
    let settings = WatchSettings {
        limits,
        ..WatchSettings::default()
    };
    let dir = tempfile::tempdir().unwrap();
    let cancel = CancellationToken::new();
    let t0 = Instant::now();
    let (watcher, mut rx) = Watcher::start(items, providers, settings, dir.path(), cancel.clone()).unwrap();

    // Phase 1: every consumer's first snapshot.
    let mut firsts = 0;
    while firsts < consumers {
        if let Some(Event::Snapshot(s)) = rx.recv().await {
            firsts += usize::from(s.first);
        }
    }
    let startup = t0.elapsed();
    let (v1, f1) = (
        fake.versions.load(Ordering::Relaxed),
        fake.fetches.load(Ordering::Relaxed),
    );
    let (rss1, _) = rss_kib();
    println!("refs={refs} consumers={consumers} rate_limit={rate}/s interval=30s max_factor=4");
    println!(
        "startup: all {consumers} first snapshots after {:.0} s simulated; {v1} version calls, {f1} fetches ({:.0} calls/min)",
        startup.as_secs_f64(),
        (v1 + f1) as f64 / startup.as_secs_f64() * 60.0
    );

    // Phase 2: steady state, nothing changes.
    let t1 = Instant::now();
    let mut events = 0u64;
    let until = t1 + Duration::from_secs(60 * minutes);
    while let Ok(Some(_)) = tokio::time::timeout_at(until, rx.recv()).await {
        events += 1;
    }
    let (v2, f2) = (
        fake.versions.load(Ordering::Relaxed) - v1,
        fake.fetches.load(Ordering::Relaxed) - f1,
    );
    let per_min = |n: u64| n as f64 / minutes as f64;
    println!(
        "steady ({minutes} min simulated, nothing changes): {:.0} version calls/min, {:.0} fetches/min, {events} events",
        per_min(v2),
        per_min(f2)
    );
    let last = minutes.min(5);
    let v_before = fake.versions.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(60 * last)).await;
    let v_last = fake.versions.load(Ordering::Relaxed) - v_before;
    println!(
        "steady, next {last} min: {:.0} version calls/min (unlimited need at 4x: {:.0}/min)",
        v_last as f64 / last as f64,
        refs as f64 / 120.0 * 60.0
    );

    // Phase 3: 1% of the objects change at once.
    let changed = (refs / 100).max(1);
    {
        let mut b = fake.bumped.lock().unwrap();
        for i in 0..changed {
            b.insert(format!("app/secret-{}", i * 100 % refs), 2);
        }
    }
    let f_before = fake.fetches.load(Ordering::Relaxed);
    let t2 = Instant::now();
    watcher.trigger(dso_secrets::watcher::Trigger::All);
    let mut snaps = 0;
    let mut latest = Duration::ZERO;
    let until = t2 + Duration::from_secs(600);
    while snaps < changed {
        match tokio::time::timeout_at(until, rx.recv()).await {
            Ok(Some(Event::Snapshot(_))) => {
                snaps += 1;
                latest = t2.elapsed();
            }
            Ok(Some(_)) => {}
            _ => break,
        }
    }
    println!(
        "change of {changed} objects + trigger: {snaps} snapshots, {} fetches, last snapshot {:.1} s simulated after the trigger",
        fake.fetches.load(Ordering::Relaxed) - f_before,
        latest.as_secs_f64()
    );
    let (rss2, hwm) = rss_kib();
    let status = watcher.status().await.unwrap();
    println!(
        "memory: RSS {rss0} KiB before, {rss1} KiB with all {refs} values held, {rss2} KiB at the end (peak {hwm} KiB); {} objects in status",
        status.objects.len()
    );
    cancel.cancel();
}
