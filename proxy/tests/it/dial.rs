//! Dialing: retry before the first byte, count what failed.

use std::time::Duration;

use dso_proxy::Backend;

use crate::support::{Client, EchoBackend, config, eventually, refused_addr, start};

#[tokio::test]
async fn a_refusing_backend_is_retried_on_the_next_one() {
    let dead = refused_addr().await;
    let live = EchoBackend::start("live").await;
    let (_proxy, listener) = start(config("app", &[Backend::new(dead), live.backend()]));
    for _ in 0..10 {
        let mut c = Client::connect(listener.local_addr())
            .await
            .expect("no client may fail");
        assert_eq!(c.tag, "live");
        c.echo(b"ping").await.unwrap();
    }
    let snap = listener.snapshot();
    assert_eq!(snap.counters.failed, 0);
    assert!(snap.counters.dial_errors >= 1);
    assert_eq!(snap.counters.retries, snap.counters.dial_errors);
    // The refusing backend is skipped for a while instead of being dialed every other time
    // (round-robin alone would dial it for 5 of the 10 connections).
    assert!(snap.counters.dial_errors <= 3, "{:?}", snap.counters);
    let d = snap.backends.iter().find(|b| b.addr == dead).unwrap();
    assert_eq!(d.counters.accepted, 0);
}

#[tokio::test]
async fn when_every_dial_fails_the_client_is_closed_and_counted() {
    let dead = refused_addr().await;
    let mut cfg = config("app", &[Backend::new(dead)]);
    cfg.dial_attempts = 3;
    let (_proxy, listener) = start(cfg);
    let err = Client::connect(listener.local_addr()).await;
    assert!(err.is_err(), "connection to a dead route should end");
    assert!(
        eventually(Duration::from_secs(2), || listener.snapshot().counters.failed
            == 1)
        .await
    );
    let snap = listener.snapshot();
    assert_eq!(snap.counters.dial_errors, 3);
    assert_eq!(snap.counters.retries, 2);
}

#[tokio::test]
async fn a_retry_follows_a_swap_that_happened_meanwhile() {
    // The only backend refuses; while the connection is retrying, a swap installs a live
    // one, and the retry reads the new route.
    let dead = refused_addr().await;
    let live = EchoBackend::start("live").await;
    let mut cfg = config("app", &[Backend::new(dead)]);
    cfg.dial_attempts = 50;
    cfg.dial_budget = Duration::from_secs(10);
    let (_proxy, listener) = start(cfg);
    let addr = listener.local_addr();
    let client = tokio::spawn(async move { Client::connect(addr).await.map(|c| c.tag) });
    assert!(
        eventually(Duration::from_secs(2), || listener.snapshot().counters.retries
            >= 2)
        .await
    );
    listener.swap(vec![live.backend()], None).unwrap();
    assert_eq!(client.await.unwrap().unwrap(), "live");
    assert_eq!(listener.snapshot().counters.failed, 0);
}

#[tokio::test]
async fn connect_latency_is_recorded() {
    let live = EchoBackend::start("live").await;
    let (_proxy, listener) = start(config("app", &[live.backend()]));
    for _ in 0..20 {
        Client::connect(listener.local_addr()).await.unwrap();
    }
    let snap = listener.snapshot();
    assert_eq!(snap.connect.count, 20);
    assert!(snap.connect.sum_us >= 20 * snap.connect.p50_us / 2);
    assert!(snap.connect.p50_us > 0 && snap.connect.p50_us <= snap.connect.p99_us);
    assert!(snap.connect.p99_us <= snap.connect.max_us);
    assert_eq!(snap.backends[0].connect.count, 20);
}
